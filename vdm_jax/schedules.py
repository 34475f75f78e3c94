"""Noise schedules gamma(t) = -log SNR(t) and the alpha / sigma / SNR helpers.

Conventions (Kingma et al. 2021, "Variational Diffusion Models"):
  gamma(t) = -log SNR(t) = log(sigma_t^2 / alpha_t^2), increasing in t in [0, 1];
  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t))  (variance preserving).

A schedule is a plain function `gamma_fn(t)` that maps an array of times of any
shape to gamma of the same shape; the factories below return such functions.
"""
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import numpy.typing as npt

from vdm_jax import _numerics
from vdm_jax.typing import GammaFn


def fixed_linear(gamma_min: float = -13.3, gamma_max: float = 5.0) -> GammaFn:
  r"""The VDM fixed linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t.

  Kingma et al. 2021, "Variational Diffusion Models" (the reference's gamma_type "fixed").

  Args:
    gamma_min: gamma(0) (float, nats of -log SNR).
    gamma_max: gamma(1); must be > gamma_min.

  Returns:
    gamma_fn mapping t (any shape, in [0, 1]) to gamma(t) of the same shape.
  """
  if not gamma_max > gamma_min:
    raise ValueError(f"fixed_linear expects gamma_max > gamma_min, got {gamma_min=}, {gamma_max=}")

  def gamma_fn(t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    return gamma_min + (gamma_max - gamma_min) * t

  return gamma_fn


def alpha_sigma(gamma: ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""Signal and noise scales for a given gamma = -log SNR.

    alpha = sqrt(sigmoid(-gamma)),  sigma = sqrt(sigmoid(gamma)),  alpha^2 + sigma^2 = 1
  (variance preserving; Kingma et al. 2021).

  Args:
    gamma: gamma = -log SNR, array of any shape.

  Returns:
    (alpha, sigma), each with the shape of gamma.
  """
  gamma = jnp.asarray(gamma)
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def alpha(gamma: ArrayLike) -> jax.Array:
  """alpha = sqrt(sigmoid(-gamma)), the signal scale; shape of gamma."""
  return jnp.sqrt(jax.nn.sigmoid(-jnp.asarray(gamma)))


def sigma(gamma: ArrayLike) -> jax.Array:
  """sigma = sqrt(sigmoid(gamma)), the noise scale; shape of gamma."""
  return jnp.sqrt(jax.nn.sigmoid(jnp.asarray(gamma)))


def snr(gamma: ArrayLike) -> jax.Array:
  """Signal-to-noise ratio alpha^2 / sigma^2 = exp(-gamma); shape of gamma."""
  return jnp.exp(-jnp.asarray(gamma))


def log_snr(gamma: ArrayLike) -> jax.Array:
  """log SNR = lambda = -gamma; shape of gamma."""
  return -jnp.asarray(gamma)


def cosine(gamma_min: float = -13.3, gamma_max: float = 5.0) -> GammaFn:
  r"""Cosine schedule (Nichol & Dhariwal 2021) in gamma form, with finite endpoints.

  The cosine schedule alphabar(u) = cos^2(pi u / 2) has gamma(u) = 2 log tan(pi u / 2),
  which is -inf at u = 0 and +inf at u = 1. We restrict u to [u_min, u_max] with
  gamma(u_min) = gamma_min and gamma(u_max) = gamma_max (clipping the time range, not the
  value, so gamma stays smooth and strictly increasing):
    u(t) = u_min + (u_max - u_min) t,  u_m = (2 / pi) arctan(exp(gamma_m / 2)),
    gamma(t) = 2 log tan(pi u(t) / 2).
  (Nichol & Dhariwal's offset s = 0.008 only changes gamma near u = 0, which the
  truncation at gamma_min replaces.)

  Args:
    gamma_min: gamma(0).
    gamma_max: gamma(1) (> gamma_min).

  Returns:
    gamma_fn mapping t (any shape, in [0, 1]) to gamma(t) of the same shape.
  """
  if not gamma_max > gamma_min:
    raise ValueError(f"cosine expects gamma_max > gamma_min, got {gamma_min=}, {gamma_max=}")
  u_min = 2.0 / math.pi * math.atan(math.exp(0.5 * gamma_min))
  u_max = 2.0 / math.pi * math.atan(math.exp(0.5 * gamma_max))

  def gamma_fn(t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    angle = 0.5 * math.pi * (u_min + (u_max - u_min) * t)
    return 2.0 * (jnp.log(jnp.sin(angle)) - jnp.log(jnp.cos(angle)))  # 2 log tan

  return gamma_fn


def ddpm_betas(kind: str, num_steps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  r"""DDPM variance schedules beta_1..beta_T (float64 numpy).

  kind:
    "linear":    beta_i = linspace(beta_start, beta_end, T)  (Ho et al. 2020; T = 1000 there,
                 Nichol & Dhariwal rescale beta_start, beta_end by 1000/T for other T).
    "quadratic": beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)^2.
    "sigmoid":   beta_i = beta_start + (beta_end - beta_start) sigmoid(linspace(-6, 6, T)).
    "cosine":    beta_i = min(1 - abar(i/T) / abar((i-1)/T), max_beta),
                 abar(u) = cos^2((u + s)/(1 + s) pi/2), s = cosine_offset (Nichol & Dhariwal 2021).

  Args:
    kind: one of "linear", "quadratic", "sigmoid", "cosine".
    num_steps: T >= 1.
    beta_start, beta_end: range of the linear/quadratic/sigmoid schedules, 0 < beta < 1.
    cosine_offset: s of the cosine schedule.
    max_beta: upper clip of the cosine schedule's betas.

  Returns:
    numpy float64 array [T] of betas in (0, 1).
  """
  if not (_numerics.is_int(num_steps) and num_steps >= 1):
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"expected 0 < beta_start <= beta_end < 1, got {beta_start=}, {beta_end=}")
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  if kind == "quadratic":
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64)**2
  if kind == "sigmoid":
    ramp = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)))
    return beta_start + (beta_end - beta_start) * ramp
  if kind == "cosine":
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    log_abar = 2.0 * np.log(np.cos((u + cosine_offset) / (1.0 + cosine_offset) * np.pi / 2))
    return np.minimum(-np.expm1(log_abar[1:] - log_abar[:-1]), max_beta)
  raise ValueError(f"kind must be 'linear', 'quadratic', 'sigmoid' or 'cosine', got {kind!r}")


def gammas_from_betas(betas: npt.ArrayLike) -> np.ndarray:
  r"""gamma_i = log(1 / alphabar_i - 1) on the DDPM grid, i = 1..T (float64 numpy).

  With L_i = -log alphabar_i = -sum_{j <= i} log1p(-beta_j):
    gamma_i = log(expm1(L_i)),  evaluated as L_i + log(-expm1(-L_i)) when L_i > 1.

  Args:
    betas: [T] numpy array in (0, 1).

  Returns:
    gammas [T] (float64), strictly increasing.
  """
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 1 or np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError(f"betas must be a non-empty 1-D array in (0, 1), got shape {betas.shape}")
  neg_log_abar = -np.cumsum(np.log1p(-betas))
  big = neg_log_abar > 1.0
  safe_small = np.where(big, 1.0, neg_log_abar)
  return np.where(big, neg_log_abar + np.log(-np.expm1(-neg_log_abar)), np.log(np.expm1(safe_small)))


def betas_from_gammas(gammas: npt.ArrayLike) -> np.ndarray:
  r"""Inverse bridge: beta_i = 1 - alphabar_i / alphabar_{i-1} with alphabar_0 = 1.

    beta_i = -expm1(softplus(gamma_{i-1}) - softplus(gamma_i)),  softplus(gamma_0) := 0.

  Args:
    gammas: [T] increasing numpy array.

  Returns:
    betas [T] (float64).
  """
  gammas = np.asarray(gammas, np.float64)
  log_inv_abar = np.logaddexp(0.0, gammas)  # softplus(gamma) = -log alphabar
  return -np.expm1(np.concatenate([[0.0], log_inv_abar[:-1]]) - log_inv_abar)


def from_betas(betas: npt.ArrayLike, *, gamma_0: float | None = None) -> GammaFn:
  r"""gamma_fn of a DDPM beta schedule: piecewise linear through (i/T, gamma_i).

  On the grid t = i/T, i = 1..T, gamma(i/T) = gamma_i = log(1/alphabar_i - 1) (see
  `gammas_from_betas`), so a T-step VDM on this schedule has DDPM's marginals
  q(x_i | x_0) at z_{i/T}. DDPM's alphabar_0 = 1 would make gamma(0) = -inf; instead
  gamma(0) is extrapolated linearly, gamma(0) = 2 gamma_1 - gamma_2 (gamma_1 - 1 if
  T = 1), unless `gamma_0` is given. Between grid points gamma is linear in t.

  Args:
    betas: [T] numpy array in (0, 1).
    gamma_0: optional value of gamma(0) (must be < gamma_1).

  Returns:
    gamma_fn mapping t (any shape, in [0, 1]) to float32 gamma(t) of the same shape.
  """
  gammas = gammas_from_betas(betas)
  if gamma_0 is None:
    gamma_0 = 2.0 * gammas[0] - gammas[1] if gammas.size > 1 else gammas[0] - 1.0
  if not gamma_0 < gammas[0]:
    raise ValueError(f"gamma_0 must be below gamma_1 = {gammas[0]}, got {gamma_0}")
  grid_gamma = jnp.asarray(np.concatenate([[gamma_0], gammas]), jnp.float32)
  grid_t = jnp.linspace(0.0, 1.0, gammas.size + 1)

  def gamma_fn(t: ArrayLike) -> jax.Array:
    return jnp.interp(jnp.asarray(t, jnp.float32), grid_t, grid_gamma)

  return gamma_fn
