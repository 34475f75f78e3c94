r"""The VDM variational bound and its terms (Kingma et al. 2021, sec. 3 and 4).

  -log p(x) <= prior + reconstruction + diffusion
    prior          = KL(q(z_1 | x) || N(0, I))
    reconstruction = E_{q(z_0 | x)} [-log p(x | z_0)]
    diffusion      = 0.5 E_{t ~ U(0,1), eps} [gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2]  (T = 0)
                   = 0.5 T E_{i, eps} [expm1(gamma_t - gamma_s) ||eps - eps_hat||^2]      (T > 0)

All losses are nats per example summed over H, W, C, shape [B].
`eps_fn(z_t, gamma_t) -> eps_hat` with z_t [B, H, W, C] and gamma_t [B];
`gamma_fn(t) -> gamma` maps [B] to [B].
"""
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Shape, Terms


def _squared_error(eps, eps_hat):
  eps, eps_hat = jnp.asarray(eps), jnp.asarray(eps_hat)
  if eps.shape != eps_hat.shape or eps.ndim < 1:
    raise ValueError(f"eps and eps_hat must have the same shape [B, ...], got {eps.shape} and {eps_hat.shape}")
  return _numerics.sum_per_example(jnp.square(eps - eps_hat))


def prior_loss(f: ArrayLike, gamma_1: ArrayLike) -> jax.Array:
  r"""KL(q(z_1 | x) || N(0, I)), the VDM latent loss.

  With alpha_1^2 = sigmoid(-gamma_1), sigma_1^2 = sigmoid(gamma_1):
    0.5 * sum_i (alpha_1^2 f_i^2 + sigma_1^2 - log sigma_1^2 - 1),
  evaluated without cancellation (see gaussian.kl_to_standard_normal_from_gamma).

  Args:
    f: encoded data in [-1, 1], [B, H, W, C].
    gamma_1: gamma at t = 1, scalar or [B].

  Returns:
    nats per example, summed over H, W, C: [B].
  """
  return _numerics.sum_per_example(gaussian.kl_to_standard_normal_from_gamma(f, gamma_1))


def reconstruction_loss(x: ArrayLike, z_0: ArrayLike, gamma_0: ArrayLike,
                        vocab_size: int = 256) -> jax.Array:
  r"""-log p(x | z_0) under the VDM categorical decoder (Kingma et al. 2021).

    -sum_i log softmax_v(-0.5 (z_0,i - alpha_0 enc(v))^2 / sigma_0^2)[x_i]

  Args:
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    z_0: latent z_0 = alpha_0 f + sigma_0 eps0, [B, H, W, C].
    gamma_0: gamma at t = 0, scalar or [B].
    vocab_size: number of values V.

  Returns:
    nats per example, summed over H, W, C: [B].
  """
  x = jnp.asarray(x)
  if x.shape != jnp.shape(z_0):
    raise ValueError(f"x and z_0 must have the same shape, got {x.shape} and {jnp.shape(z_0)}")
  logprobs = decoders.categorical_logprobs(z_0, gamma_0, vocab_size)
  picked = jnp.take_along_axis(logprobs, x.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  return -_numerics.sum_per_example(picked)


def diffusion_loss(eps: ArrayLike, eps_hat: ArrayLike, dgamma_dt: ArrayLike) -> jax.Array:
  r"""Continuous-time diffusion loss for one t per example (VDM eq. 17).

    0.5 * gamma'(t) * ||eps - eps_hat||^2

  Args:
    eps: the noise used to form z_t, [B, H, W, C].
    eps_hat: the model's prediction of eps, [B, H, W, C].
    dgamma_dt: gamma'(t), scalar or [B].

  Returns:
    nats per example (an unbiased one-sample estimate), summed over H, W, C: [B].
  """
  return 0.5 * dgamma_dt * _squared_error(eps, eps_hat)


def discrete_diffusion_loss(eps: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike,
                            gamma_s: ArrayLike, num_steps: int) -> jax.Array:
  r"""Discrete-time diffusion loss for one step per example (VDM eq. 13-15).

    0.5 * T * expm1(gamma_t - gamma_s) * ||eps - eps_hat||^2,  s = t - 1/T

  Args:
    eps: the noise used to form z_t, [B, H, W, C].
    eps_hat: prediction of eps at (z_t, gamma_t), [B, H, W, C].
    gamma_t: gamma(t), scalar or [B].
    gamma_s: gamma(s), scalar or [B].
    num_steps: T > 0, the number of steps (the step index is drawn uniformly).

  Returns:
    nats per example (one-sample estimate of sum_i L_i), summed over H, W, C: [B].
  """
  return 0.5 * num_steps * jnp.expm1(gamma_t - gamma_s) * _squared_error(eps, eps_hat)


def _check_options(num_steps, vocab_size):
  if not (_numerics.is_int(num_steps) and num_steps >= 0):
    raise ValueError(f"num_steps must be an int >= 0 (0 = continuous time), got {num_steps!r}")
  if not (_numerics.is_int(vocab_size) and vocab_size >= 2):
    raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")


def round_up_to_grid(t: ArrayLike, num_steps: int) -> tuple[jax.Array, jax.Array]:
  r"""Discrete-time rounding of the VDM reference: t <- ceil(t T) / T, s = t - 1/T.

  Args:
    t: times in (0, 1], [B].
    num_steps: T > 0.

  Returns:
    (t_rounded, s), each [B].
  """
  t = jnp.ceil(t * num_steps) / num_steps
  return t, t - 1.0 / num_steps


def vdm_loss_from_noise(eps_fn: EpsFn, gamma_fn: GammaFn, x: ArrayLike, t: ArrayLike,
                        eps: ArrayLike, eps0: ArrayLike, *, num_steps: int = 0,
                        vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""The VDM loss terms for given times and noises (deterministic given its inputs).

  Kingma et al. 2021, eq. 13-17 (see the module docstring for the three terms).

  f = encode(x); z_0 = alpha_0 f + sigma_0 eps0; z_t = alpha_t f + sigma_t eps;
  continuous (T = 0): diffusion = 0.5 gamma'(t) ||eps - eps_fn(z_t, gamma_t)||^2 with
  gamma'(t) from jax.jvp of gamma_fn (tangent ones); discrete (T > 0): t is first
  rounded up, t <- ceil(t T)/T, s = t - 1/T, and diffusion = 0.5 T expm1(gamma_t -
  gamma_s) ||eps - eps_hat||^2.

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_fn: t [B] -> gamma [B].
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    t: times in [0, 1] (in (0, 1] for T > 0), [B].
    eps: noise for z_t, [B, H, W, C].
    eps0: noise for z_0, [B, H, W, C].
    num_steps: T; 0 means continuous time.
    vocab_size: number of values V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'}: each [B]), nats per
    example summed over H, W, C; loss = sum of the terms.
  """
  _check_options(num_steps, vocab_size)
  x, f = _check_and_encode(x, t, eps, eps0, vocab_size)
  terms = _endpoint_terms(x, f, gamma_fn(jnp.zeros_like(t)), gamma_fn(jnp.ones_like(t)), eps0,
                          vocab_size)
  if num_steps == 0:
    eps_hat, _, dgamma_dt = eps_prediction(eps_fn, gamma_fn, f, t, eps)
    terms["diffusion"] = diffusion_loss(eps, eps_hat, dgamma_dt)
  else:
    t, s = round_up_to_grid(t, num_steps)
    gamma_t, gamma_s = gamma_fn(t), gamma_fn(s)
    eps_hat = eps_fn(gaussian.sample_forward(f, gamma_t, eps), gamma_t)
    terms["diffusion"] = discrete_diffusion_loss(eps, eps_hat, gamma_t, gamma_s, num_steps)
  return bound_from_terms(terms), terms


def eps_prediction(eps_fn: EpsFn, gamma_fn: GammaFn, f: ArrayLike, t: ArrayLike,
                   eps: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""The network's input and output for one continuous time per example.

  gamma_t, gamma'(t) = jax.jvp(gamma_fn, t, 1); z_t = alpha_t f + sigma_t eps;
  eps_hat = eps_fn(z_t, gamma_t).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_fn: t [B] -> gamma [B].
    f: encoded data, [B, H, W, C].
    t: times in [0, 1], [B].
    eps: noise for z_t, [B, H, W, C].

  Returns:
    (eps_hat [B, H, W, C], gamma_t [B], dgamma_dt [B]).
  """
  gamma_t, dgamma_dt = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
  return eps_fn(gaussian.sample_forward(f, gamma_t, eps), gamma_t), gamma_t, dgamma_dt


def _check_and_encode(x, t, eps, eps0, vocab_size):
  """Checks x [B, ...], t [B], eps and eps0 shaped like x; returns (x, f = encode(x))."""
  x = jnp.asarray(x)
  if x.ndim < 2 or jnp.shape(t) != x.shape[:1]:
    raise ValueError(f"expected x [B, ...] and t [B], got x {x.shape} and t {jnp.shape(t)}")
  if jnp.shape(eps) != x.shape or jnp.shape(eps0) != x.shape:
    raise ValueError(f"eps and eps0 must have the shape of x {x.shape}, got {jnp.shape(eps)}, "
                     f"{jnp.shape(eps0)}")
  return x, decoders.encode(x, vocab_size)


def _endpoint_terms(x, f, gamma_0, gamma_1, eps0, vocab_size):
  """{"prior": [B], "reconstruction": [B]} with z_0 = alpha_0 f + sigma_0 eps0."""
  z_0 = gaussian.sample_forward(f, gamma_0, eps0)
  return {"prior": prior_loss(f, gamma_1),
          "reconstruction": reconstruction_loss(x, z_0, gamma_0, vocab_size)}


def bound_from_terms(terms: Terms) -> jax.Array:
  """The VDM bound from its terms: prior + reconstruction + diffusion, [B] nats."""
  return terms["prior"] + terms["reconstruction"] + terms["diffusion"]


def sample_times(key: PRNGKey, batch_size: int, *, antithetic: bool = True) -> jax.Array:
  r"""Diffusion times t ~ U(0, 1), optionally antithetic (low-discrepancy).

  antithetic: t0 ~ U(0, 1) (one scalar), t_i = mod(t0 + i / B, 1); else t_i iid U(0, 1).

  Args:
    key: PRNG key.
    batch_size: B.
    antithetic: whether to use the stratified times of VDM appendix I.1.

  Returns:
    t, [B] float32.
  """
  if antithetic:
    return antithetic_times(jax.random.uniform(key, ()), batch_size)
  return jax.random.uniform(key, (batch_size,))


def antithetic_times(t0: ArrayLike, batch_size: int) -> jax.Array:
  """Stratified times t_i = mod(t0 + i / B, 1) from one t0 in [0, 1) (VDM appendix I.1).

  Args:
    t0: scalar offset in [0, 1).
    batch_size: B.

  Returns:
    t, [B] float32 in [0, 1), exactly one in each interval [k / B, (k + 1) / B).
  """
  return jnp.mod(t0 + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def vdm_loss(eps_fn: EpsFn, gamma_fn: GammaFn, x: ArrayLike, key: PRNGKey, *, num_steps: int = 0,
             antithetic: bool = True, vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""One-sample estimate of the VDM bound -log p(x) <= prior + reconstruction + diffusion.

  Kingma et al. 2021 (the terms and their equations are listed in the module docstring).

  Draws, from key split in three and in this order: eps0 ~ N(0, I) (for z_0),
  t (see `sample_times`), eps ~ N(0, I) (for z_t); then calls `vdm_loss_from_noise`.

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_fn: t [B] -> gamma [B], increasing.
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    key: PRNG key.
    num_steps: T; 0 means continuous time.
    antithetic: stratified times t_i = mod(t0 + i/B, 1).
    vocab_size: number of values V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'}: each [B]), nats per
    example summed over H, W, C.
  """
  _check_options(num_steps, vocab_size)
  t, eps, eps0 = draw_noise(key, jnp.shape(x), antithetic=antithetic)
  return vdm_loss_from_noise(eps_fn, gamma_fn, x, t, eps, eps0, num_steps=num_steps, vocab_size=vocab_size)


def draw_noise(key: PRNGKey, shape: Shape, *,
               antithetic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""The random inputs of one bound estimate: key split in three, drawn in this order:
  eps0 ~ N(0, I) (for z_0), t (see `sample_times`), eps ~ N(0, I) (for z_t).

  Args:
    key: PRNG key.
    shape: (B, H, W, C), the shape of x.
    antithetic: stratified times.

  Returns:
    (t [B], eps [shape], eps0 [shape]), float32.
  """
  if len(shape) < 2:
    raise ValueError(f"x must be [B, ...] with at least 2 axes, got shape {tuple(shape)}")
  key_eps0, key_t, key_eps = jax.random.split(key, 3)
  eps0 = jax.random.normal(key_eps0, shape)
  t = sample_times(key_t, shape[0], antithetic=antithetic)
  return t, jax.random.normal(key_eps, shape), eps0


def bits_per_dim(nats: ArrayLike, num_dims: int) -> jax.Array:
  r"""Converts nats per example to bits per dimension: nats / (D ln 2).

  Args:
    nats: any array (e.g. [B] losses summed over H, W, C).
    num_dims: D = H * W * C (positive int).

  Returns:
    bits per dimension, shape of nats.
  """
  if not (_numerics.is_int(num_dims) and num_dims > 0):
    raise ValueError(f"num_dims must be a positive int (H*W*C), got {num_dims!r}")
  return jnp.asarray(nats) / (num_dims * math.log(2.0))
