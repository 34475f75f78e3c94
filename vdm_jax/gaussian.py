r"""Gaussian building blocks of the VDM / DDPM forward process and their KLs.

Forward process (variance preserving), with alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t):
  q(z_t | x)   = N(alpha_t f, sigma_t^2 I)
  q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2 I),  s < t,
  alpha_{t|s} = alpha_t / alpha_s,  sigma_{t|s}^2 = -expm1(gamma_s - gamma_t) sigma_t^2.

`gamma` arguments are scalars or [B]; a [B] gamma is broadcast over the trailing
H, W, C axes of the data it is combined with.
"""
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import schedules


def broadcast_to_data(gamma: ArrayLike, ndim: int) -> jax.Array:
  """Reshapes a scalar or [B] gamma to broadcast against an array of rank `ndim`.

  Args:
    gamma: scalar or array [B] (or [B, ...] with fewer than `ndim` axes).
    ndim: rank of the data array, e.g. 4 for [B, H, W, C].

  Returns:
    gamma with trailing singleton axes appended: shape gamma.shape + (1,) * (ndim - gamma.ndim).
  """
  gamma = jnp.asarray(gamma)
  if gamma.ndim > ndim:
    raise ValueError(f"gamma has rank {gamma.ndim} ({gamma.shape}); expected at most the data rank {ndim}")
  return jnp.reshape(gamma, gamma.shape + (1,) * (ndim - gamma.ndim))


def forward_marginal(f: ArrayLike, gamma: ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""Mean and variance of q(z_t | x) = N(alpha_t f, sigma_t^2 I) (Kingma et al. 2021, eq. 1).

    mean = alpha_t f = sqrt(sigmoid(-gamma_t)) f,  var = sigma_t^2 = sigmoid(gamma_t)

  Args:
    f: encoded data, [B, H, W, C] (any shape).
    gamma: gamma_t, scalar or [B].

  Returns:
    (mean [B, H, W, C], var broadcastable to it: [B, 1, 1, 1] or scalar).
  """
  f = jnp.asarray(f)
  gamma = broadcast_to_data(gamma, f.ndim)
  alpha_t, _ = schedules.alpha_sigma(gamma)
  return alpha_t * f, jax.nn.sigmoid(gamma)  # sigma_t^2 = sigmoid(gamma_t)


def sample_forward(f: ArrayLike, gamma: ArrayLike, eps: ArrayLike) -> jax.Array:
  r"""Reparameterised sample of q(z_t | x): z_t = alpha_t f + sigma_t eps.

  Args:
    f: encoded data, [B, H, W, C].
    gamma: gamma_t, scalar or [B].
    eps: standard normal noise, same shape as f.

  Returns:
    z_t, [B, H, W, C].
  """
  f = jnp.asarray(f)
  if jnp.shape(eps) != f.shape:
    raise ValueError(f"eps must have the shape of f {f.shape}, got {jnp.shape(eps)}")
  alpha_t, sigma_t = schedules.alpha_sigma(broadcast_to_data(gamma, f.ndim))
  return alpha_t * f + sigma_t * eps


def transition(gamma_s: ArrayLike, gamma_t: ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""Scale and variance of q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2 I), s < t.

    alpha_{t|s}^2 = alpha_t^2 / alpha_s^2 = exp(softplus(gamma_s) - softplus(gamma_t))
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = -expm1(gamma_s - gamma_t) sigmoid(gamma_t)

  Args:
    gamma_s: gamma at the earlier time s, scalar or [B].
    gamma_t: gamma at the later time t (gamma_t >= gamma_s), scalar or [B].

  Returns:
    (alpha_ts, var_ts), both of the broadcast shape of gamma_s and gamma_t.
  """
  gamma_s, gamma_t = jnp.asarray(gamma_s), jnp.asarray(gamma_t)
  alpha_ts = _numerics.alpha_ratio(gamma_s, gamma_t)
  var_ts = -jnp.expm1(gamma_s - gamma_t) * jax.nn.sigmoid(gamma_t)
  return alpha_ts, var_ts


def posterior(z_t: ArrayLike, f: ArrayLike, gamma_s: ArrayLike,
              gamma_t: ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""Mean and variance of the forward-process posterior q(z_s | z_t, x), s < t.

  With c = -expm1(gamma_s - gamma_t) = sigma_{t|s}^2 / sigma_t^2 (Bayes' rule for
  the two Gaussians q(z_s | x) and q(z_t | z_s)):
    mean = alpha_s (exp(gamma_s - gamma_t) z_t / alpha_t + c f)
         = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 f
    var  = c sigma_s^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2
  On the DDPM grid these are mu-tilde and beta-tilde of Ho et al. (2020), eq. 7.

  Args:
    z_t: latent at time t, [B, H, W, C].
    f: encoded data (or its prediction), [B, H, W, C].
    gamma_s: gamma at s, scalar or [B].
    gamma_t: gamma at t (> gamma_s), scalar or [B].

  Returns:
    (mean [B, H, W, C], var broadcastable to it).
  """
  z_t = jnp.asarray(z_t)
  gamma_s = broadcast_to_data(gamma_s, z_t.ndim)
  gamma_t = broadcast_to_data(gamma_t, z_t.ndim)
  c = -jnp.expm1(gamma_s - gamma_t)
  alpha_s = schedules.alpha(gamma_s)
  alpha_t = schedules.alpha(gamma_t)
  mean = alpha_s * (jnp.exp(gamma_s - gamma_t) * z_t / alpha_t + c * f)
  return mean, c * jax.nn.sigmoid(gamma_s)


def _expm1_minus_x(y):
  """exp(y) - 1 - y without cancellation near y = 0 (Taylor series for |y| < 0.5)."""
  small = jnp.abs(y) < 0.5
  y_small = jnp.where(small, y, 0.0)
  # sum_{k=2}^{12} y^k / k!, Horner form; the truncation error is < 0.5^13/13! relative.
  series = jnp.zeros_like(y_small)
  for k in range(12, 1, -1):
    series = (series + 1.0) * y_small / k
  series = series * y_small
  y_big = jnp.where(small, 1.0, y)
  return jnp.where(small, series, jnp.expm1(y_big) - y_big)


def kl_normal(mean_q: ArrayLike, var_q: ArrayLike, mean_p: ArrayLike,
              var_p: ArrayLike) -> jax.Array:
  r"""Elementwise KL(N(mean_q, var_q) || N(mean_p, var_p)) in nats.

    KL = 0.5 ((mean_q - mean_p)^2 / var_p + r - 1 - log r),  r = var_q / var_p,
  with r - 1 - log r evaluated as expm1(log r) - log r without cancellation.

  Args:
    mean_q, var_q, mean_p, var_p: broadcastable arrays; variances > 0.

  Returns:
    KL per element, the broadcast shape of the inputs (nats, not summed).
  """
  log_r = jnp.log(var_q) - jnp.log(var_p)
  return 0.5 * (jnp.square(mean_q - mean_p) / var_p + _expm1_minus_x(log_r))


def kl_to_standard_normal(mean: ArrayLike, var: ArrayLike) -> jax.Array:
  r"""Elementwise KL(N(mean, var) || N(0, 1)) = 0.5 (mean^2 + var - 1 - log var), nats.

  Args:
    mean, var: broadcastable arrays; var > 0.

  Returns:
    KL per element, the broadcast shape of mean and var (nats, not summed).
  """
  return kl_normal(mean, var, 0.0, 1.0)


def kl_to_standard_normal_from_gamma(f: ArrayLike, gamma: ArrayLike) -> jax.Array:
  r"""Elementwise KL(q(z_t | x) || N(0, 1)) written in gamma for stability.

    0.5 (alpha^2 f^2 + sigma^2 - 1 - log sigma^2),  log sigma^2 = -softplus(-gamma),
  where sigma^2 - 1 - log sigma^2 = expm1(y) - y with y = -softplus(-gamma).

  Args:
    f: encoded data, [B, H, W, C].
    gamma: scalar or [B].

  Returns:
    KL per element, [B, H, W, C] (nats, not summed).
  """
  f = jnp.asarray(f)
  gamma = broadcast_to_data(gamma, f.ndim)
  alpha2 = jax.nn.sigmoid(-gamma)
  return 0.5 * (alpha2 * jnp.square(f) + _expm1_minus_x(-jax.nn.softplus(-gamma)))
