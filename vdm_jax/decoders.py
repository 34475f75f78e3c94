r"""Encoders and decoders between discrete data x and continuous latents.

VDM (Kingma et al. 2021): x in {0, ..., V-1} is encoded as the centre of its bin,
f = 2 (x + 0.5) / V - 1, and decoded by a factorised categorical distribution
p(x_i = v | z_0) proportional to N(z_0,i; alpha_0 enc(v), sigma_0^2).

DDPM (Ho et al. 2020, sec. 3.3): x is scaled to x / 127.5 - 1 (for V = 256) and
decoded with a discretised Gaussian whose outer bins extend to +-infinity.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import gaussian
from vdm_jax import schedules
from vdm_jax.typing import PRNGKey


def _check_vocab(vocab_size):
  if not (_numerics.is_int(vocab_size) and vocab_size >= 2):
    raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")


def encode(x: ArrayLike, vocab_size: int = 256) -> jax.Array:
  r"""VDM encoding of integer data: f = 2 (round(x) + 0.5) / vocab_size - 1.

  The centre of x's bin of width 2 / V in [-1, 1] (Kingma et al. 2021).

  Args:
    x: integer values in {0, ..., vocab_size - 1}, any shape (e.g. [B, H, W, C]).
    vocab_size: number of values V.

  Returns:
    f in (-1, 1), float32, shape of x.
  """
  _check_vocab(vocab_size)
  x = jnp.round(jnp.asarray(x, jnp.float32))
  return 2.0 * ((x + 0.5) / vocab_size) - 1.0


def categorical_logprobs(z_0: ArrayLike, gamma_0: ArrayLike, vocab_size: int = 256) -> jax.Array:
  r"""VDM decoder log p(x_i = v | z_0) for every value v (Kingma et al. 2021).

    logit_v = -0.5 (z_0 - alpha_0 enc(v))^2 / sigma_0^2,  log p = log_softmax_v(logit),
  equal to the reference's form -0.5 ((z_0 / alpha_0 - enc(v)) exp(-gamma_0 / 2))^2.

  Args:
    z_0: the latent z_0 = alpha_0 f + sigma_0 eps (not rescaled), [B, H, W, C].
    gamma_0: gamma at t = 0, scalar or [B].
    vocab_size: number of values V.

  Returns:
    log-probabilities, [B, H, W, C, V] (nats).
  """
  _check_vocab(vocab_size)
  z_0 = jnp.asarray(z_0)
  gamma_0 = gaussian.broadcast_to_data(gamma_0, z_0.ndim)[..., None]
  alpha_0 = schedules.alpha(gamma_0)
  var_0 = jax.nn.sigmoid(gamma_0)  # sigma_0^2
  centres = encode(jnp.arange(vocab_size), vocab_size)
  logits = -0.5 * jnp.square(z_0[..., None] - alpha_0 * centres) / var_0
  return jax.nn.log_softmax(logits, axis=-1)


def grid_noise_estimate(z_t: ArrayLike, gamma_t: ArrayLike, vocab_size: int = 256,
                        prior_logits: ArrayLike | None = None) -> jax.Array:
  r"""The noise eps a per-pixel prior on the V-level data grid predicts from z_t.

  Each value independent, with prior p(v) = softmax_v(prior_logits) on the levels enc(v)
  (uniform when prior_logits is None): the posterior over v is
    log p(v | z_t) = log_softmax_v(categorical_logprobs(z_t, gamma_t) + prior_logits),
  and the Bayes estimate of the noise is
    eps_grid = (z_t - alpha_t E[enc(v) | z_t]) / sigma_t.
  At low noise it snaps z_t to the nearest level (eps_grid = the offset / sigma_t); at high
  noise it tends to z_t / sigma_t. A network that adds its output to it only learns how
  neighbouring values depend on each other (ModelConfig.grid_skip).

  Args:
    z_t: latent, [B, H, W, C].
    gamma_t: scalar or [B].
    vocab_size: number of values V.
    prior_logits: None (uniform) or unnormalised log prior, broadcastable to
      [B, H, W, C, V], e.g. per pixel [H, W, C, V] (ModelConfig.grid_prior learns it).

  Returns:
    eps_grid, [B, H, W, C] (float32).
  """
  z_t = jnp.asarray(z_t, jnp.float32)
  logprobs = categorical_logprobs(z_t, gamma_t, vocab_size)
  if prior_logits is not None:
    logprobs = jax.nn.log_softmax(logprobs + prior_logits, axis=-1)
  probs = jnp.exp(logprobs)
  f_hat = probs @ encode(jnp.arange(vocab_size), vocab_size)
  gamma_t = gaussian.broadcast_to_data(gamma_t, z_t.ndim)
  return (z_t - schedules.alpha(gamma_t) * f_hat) / schedules.sigma(gamma_t)


def decode(z_0: ArrayLike, gamma_0: ArrayLike, *, key: PRNGKey | None = None,
           vocab_size: int = 256) -> jax.Array:
  r"""Decodes z_0 to integers with the VDM categorical decoder.

  x = argmax_v log p(x = v | z_0) when key is None, else x ~ p(x | z_0).

  Args:
    z_0: latent at t = 0, [B, H, W, C].
    gamma_0: gamma at t = 0, scalar or [B].
    key: optional PRNG key; None means argmax.
    vocab_size: number of values V.

  Returns:
    int32 values in {0, ..., V-1}, [B, H, W, C].
  """
  logprobs = categorical_logprobs(z_0, gamma_0, vocab_size)
  if key is None:
    return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logprobs, axis=-1).astype(jnp.int32)


def ddpm_encode(x: ArrayLike, vocab_size: int = 256) -> jax.Array:
  r"""DDPM scaling of integer data: f = 2 x / (vocab_size - 1) - 1 (x / 127.5 - 1 for V = 256).

  Ho et al. 2020, sec. 3.3 (the data scaled linearly to [-1, 1]).

  Args:
    x: integers in {0, ..., V-1}, any shape.
    vocab_size: number of values V.

  Returns:
    float32 in [-1, 1], shape of x.
  """
  _check_vocab(vocab_size)
  return 2.0 * jnp.asarray(x, jnp.float32) / (vocab_size - 1) - 1.0


def _log_ndtr_diff(upper, lower):
  """log(Phi(upper) - Phi(lower)) for upper > lower, computed in the tail where it is accurate."""
  # In the upper tail use Phi(u) - Phi(l) = Phi(-l) - Phi(-u).
  flip = (upper + lower) > 0
  hi = jnp.where(flip, -lower, upper)
  lo = jnp.where(flip, -upper, lower)
  log_hi = special.log_ndtr(hi)
  log_lo = special.log_ndtr(lo)
  return log_hi + _log1mexp(log_lo - log_hi)


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def _log_normal_mass(upper, lower):
  """log int_lower^upper N(u; 0, 1) du for finite upper > lower.

  When the density varies little over the bin ((upper - lower)(|mid| + 1) < 1) the CDF
  difference cancels in float32, so the integral is taken by 4-point Gauss-Legendre
  quadrature in log space (relative error < 1e-8 there); otherwise as a log-CDF difference.
  """
  mid, half = 0.5 * (upper + lower), 0.5 * (upper - lower)
  narrow = 2.0 * half * (jnp.abs(mid) + 1.0) < 1.0
  # Each branch gets inputs on which it is well defined, so gradients stay finite.
  half_q = jnp.where(narrow, half, 0.5)
  nodes = mid[..., None] + half_q[..., None] * _GL_NODES
  quadrature = jnp.log(half_q) - 0.5 * math.log(2.0 * math.pi) + jax.nn.logsumexp(
      np.log(_GL_WEIGHTS) - 0.5 * jnp.square(nodes), axis=-1)
  cdf_diff = _log_ndtr_diff(jnp.where(narrow, lower + 2.0, upper), lower)
  return jnp.where(narrow, quadrature, cdf_diff)


def _log1mexp(a):
  """log(1 - exp(a)) for a < 0: log(-expm1(a)) near 0, log1p(-exp(a)) in the tail."""
  near_zero = a > -0.6931471805599453  # -log 2
  a_near = jnp.where(near_zero, a, -1.0)
  a_far = jnp.where(near_zero, -1.0, a)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(a_near)), jnp.log1p(-jnp.exp(a_far)))


def discretized_gaussian_logprobs(mean: ArrayLike, log_scale: ArrayLike,
                                  vocab_size: int = 256) -> jax.Array:
  r"""DDPM discretised-Gaussian decoder log p(x = v) for every value v (Ho et al. 2020, eq. 13).

  With data scaled to c_v = 2 v / (V - 1) - 1 and bin half-width delta = 1 / (V - 1):
    p(v) = Phi((c_v + delta - mean) / scale) - Phi((c_v - delta - mean) / scale),
  where the first bin's lower edge is -inf and the last bin's upper edge is +inf,
  so sum_v p(v) = 1. Evaluated as log-CDF differences (log_ndtr), or by quadrature of the
  density for bins narrow against the scale, so it is accurate in float32 everywhere.

  Args:
    mean: decoder mean in DDPM scaling, any shape S (e.g. [B, H, W, C]).
    log_scale: log standard deviation, broadcastable to S.
    vocab_size: number of values V.

  Returns:
    log-probabilities, S + [V] (nats).
  """
  _check_vocab(vocab_size)
  mean = jnp.asarray(mean)[..., None]
  inv_scale = jnp.exp(-jnp.asarray(log_scale))[..., None]
  # Bin v covers [b_{v-1}, b_v] with b_v = (2 v + 1) / (V - 1) - 1; each inner edge is rounded
  # once and shared by its two bins, so the masses telescope to 1.
  edges = (2.0 * jnp.arange(vocab_size - 1) + 1.0) / (vocab_size - 1) - 1.0
  standardized = (edges - mean) * inv_scale  # [..., V - 1]
  upper = jnp.concatenate([standardized, standardized[..., -1:] + 1.0], axis=-1)
  lower = jnp.concatenate([standardized[..., :1] - 1.0, standardized], axis=-1)
  # Interior bins; the edge bins are replaced below (their outer edge is a finite dummy here).
  index = jnp.arange(vocab_size)
  interior = _log_normal_mass(upper, lower)
  first = special.log_ndtr(upper)  # Phi(upper) - Phi(-inf)
  last = special.log_ndtr(-lower)  # Phi(inf) - Phi(lower)
  return jnp.where(index == 0, first, jnp.where(index == vocab_size - 1, last, interior))


def discretized_gaussian_log_likelihood(x: ArrayLike, mean: ArrayLike, log_scale: ArrayLike,
                                        vocab_size: int = 256) -> jax.Array:
  r"""log p(x | mean, scale) of the DDPM discretised-Gaussian decoder, summed per example.

    sum_i log p(x_i),  p(x_i) from `discretized_gaussian_logprobs` (Ho et al. 2020, eq. 13).

  Args:
    x: integers in {0, ..., V-1}, [B, H, W, C].
    mean: decoder mean in DDPM scaling (x / 127.5 - 1 for V = 256), [B, H, W, C].
    log_scale: log standard deviation, broadcastable to [B, H, W, C].
    vocab_size: number of values V.

  Returns:
    log-likelihood in nats per example, summed over H, W, C: [B].
  """
  logprobs = discretized_gaussian_logprobs(mean, log_scale, vocab_size)
  x = jnp.asarray(x, jnp.int32)
  picked = jnp.take_along_axis(logprobs, x[..., None], axis=-1)[..., 0]
  return _numerics.sum_per_example(picked)
