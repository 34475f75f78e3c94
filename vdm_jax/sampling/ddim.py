r"""DDIM (Song et al. 2021): the deterministic step, its stochastic generalisation, the sampler.

The deterministic step from (z, gamma_cur) to gamma_next with eps_hat held fixed is
DDIM = DPM-Solver-1 (Lu et al. 2022), exact for either direction of time:

  z_next = (alpha_next / alpha_cur) z - sigma_next expm1((gamma_cur - gamma_next) / 2) eps_hat.
"""
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import gaussian
from vdm_jax import schedules
from vdm_jax.sampling import grid
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Shape


def ddim_update(z: jax.Array, eps_hat: ArrayLike, gamma_cur: ArrayLike,
                gamma_next: ArrayLike) -> jax.Array:
  r"""The deterministic DDIM / DPM-Solver-1 step from gamma_cur to gamma_next.

  Song et al. 2021, eq. 12 with eta = 0; Lu et al. 2022, DPM-Solver-1.

    z_next = (alpha_next / alpha_cur) z - sigma_next expm1((gamma_cur - gamma_next) / 2) eps_hat
  with alpha_next / alpha_cur = exp((softplus(gamma_cur) - softplus(gamma_next)) / 2).

  Args:
    z: latent at gamma_cur, [B, ...].
    eps_hat: noise prediction at (z, gamma_cur), [B, ...].
    gamma_cur, gamma_next: scalar or [B] (either order: decoding or encoding).

  Returns:
    latent at gamma_next, [B, ...].
  """
  g_cur = gaussian.broadcast_to_data(gamma_cur, z.ndim)
  g_next = gaussian.broadcast_to_data(gamma_next, z.ndim)
  sigma_next = schedules.sigma(g_next)
  return _numerics.alpha_ratio(g_cur, g_next) * z - sigma_next * jnp.expm1(0.5 * (g_cur - g_next)) * eps_hat


def ddim_step(z_t: jax.Array, eps_hat: ArrayLike, gamma_t: ArrayLike, gamma_s: ArrayLike,
              noise: ArrayLike, *, eta: float | jax.Array = 0.0) -> jax.Array:
  r"""Generalised DDIM step (Song et al. 2021, eq. 12) from t to s < t.

    x0_hat = (z_t - sigma_t eps_hat) / alpha_t,  c = -expm1(gamma_s - gamma_t)
    sigma_eta^2 = eta^2 c sigma_s^2
    z_s = alpha_s x0_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta noise
  written without x0_hat; eta = 0 is `ddim_update`, eta = 1 the ancestral step.

  Args:
    z_t: [B, ...]; eps_hat: eps_fn(z_t, gamma_t), [B, ...].
    gamma_t, gamma_s: scalar or [B], gamma_s < gamma_t.
    noise: standard normal, shape of z_t (unused when eta = 0).
    eta: >= 0, scalar (may be traced).

  Returns:
    z_s, shape of z_t.
  """
  z_s = ddim_update(z_t, eps_hat, gamma_t, gamma_s)
  g_t = gaussian.broadcast_to_data(gamma_t, z_t.ndim)
  g_s = gaussian.broadcast_to_data(gamma_s, z_t.ndim)
  var_eta = jnp.square(eta) * -jnp.expm1(g_s - g_t)  # sigma_eta^2 / sigma_s^2
  sigma_s = schedules.sigma(g_s)
  # sqrt(1 - v) - 1 = -v / (1 + sqrt(1 - v)), no cancellation for small v.
  shrink = -var_eta / (1.0 + jnp.sqrt(1.0 - var_eta))
  return z_s + sigma_s * (shrink * eps_hat + jnp.sqrt(var_eta) * noise)


def ddim_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: PRNGKey, shape: Shape, *,
                num_steps: int = 50, eta: float | jax.Array = 0.0,
                times: ArrayLike | None = None) -> jax.Array:
  r"""DDIM sampling (Song et al. 2021) on a uniform grid or any subsequence `times`.

  eta = 0 is deterministic given z_1 (the DDIM ODE step); eta = 1 equals
  ancestral sampling on the same grid. z_1 uses split(key)[0], step i the noise
  normal(fold_in(split(key)[1], i)).

  Args:
    eps_fn: eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t [B] -> gamma [B].
    key: PRNG key.
    shape: (B, H, W, C) (any (B, ...)).
    num_steps: N, network calls on the grid (N - i) / N (ignored when times is given).
    eta: >= 0, stochasticity.
    times: optional decreasing grid [M + 1] (e.g. a subsequence of a T-step DDPM grid).

  Returns:
    z_0, float32 of `shape`.
  """
  shape = grid.check_shape(shape)
  if not isinstance(eta, jax.Array) and not eta >= 0:
    raise ValueError(f"eta must be >= 0, got {eta!r}")
  times = grid.grid_or_default(num_steps, times)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)

  def body(i, z):
    gamma_t = grid.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = grid.gamma_at(gamma_fn, times[i + 1], shape[0])
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
    return ddim_step(z, eps_fn(z, gamma_t), gamma_t, gamma_s, noise, eta=eta)

  return jax.lax.fori_loop(0, times.shape[0] - 1, body, z)
