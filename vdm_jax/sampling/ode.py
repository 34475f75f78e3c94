r"""Probability-flow ODE samplers: DPM-Solver++(2M), Heun, Euler (= DDIM).

The probability-flow ODE of the variance-preserving diffusion, written in the
scaled variables xbar = z / alpha and sigmabar = sigma / alpha = exp(gamma / 2)
= exp(-lambda) (lambda = log(alpha / sigma) = -gamma / 2, the half log-SNR), is

  d xbar / d sigmabar = eps_hat(z, gamma)                  (Song et al. 2021;
                                                            Karras et al. 2022)

and in log-SNR time, with the data prediction x0_hat = (z - sigma eps_hat) / alpha,

  z_t = (sigma_t / sigma_s) z_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0_hat d lambda
                                                           (Lu et al. 2022, eq. 9).

The Euler step in these variables is DDIM (vdm_jax.sampling.ddim.ddim_update); it is
exact for either direction of time, so the solvers encode (t up) and decode (t down). `eps_fn(z_t, gamma_t)` maps z [B, ...] and gamma [B] to
eps_hat [B, ...]; `gamma_fn(t)` maps [B] to [B].
"""
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import gaussian
from vdm_jax import schedules
from vdm_jax import weighted_losses
from vdm_jax.sampling import ddim
from vdm_jax.sampling import grid
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Shape

SOLVERS: tuple[str, ...] = ("dpm_solver_2m", "heun", "euler")


def _dpm_solver_2m_update(z, x0, x0_prev, h_prev, gamma_cur, gamma_next, first):
  r"""DPM-Solver++(2M) step (Lu et al. 2022b, Alg. 2), data prediction, multistep.

    h = lambda_next - lambda_cur = (gamma_cur - gamma_next) / 2,  r = h_prev / h
    D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev        (D = x0 on the first step)
    z_next = (sigma_next / sigma_cur) z - alpha_next expm1(-h) D
  """
  g_cur = gaussian.broadcast_to_data(gamma_cur, z.ndim)
  g_next = gaussian.broadcast_to_data(gamma_next, z.ndim)
  h = 0.5 * (g_cur - g_next)
  r = h_prev / jnp.where(h == 0, 1.0, h)
  r = jnp.where(first, 1.0, r)
  d = jnp.where(first, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
  # sigma_next / sigma_cur = exp((log sigmoid(g_next) - log sigmoid(g_cur)) / 2)
  sigma_ratio = jnp.exp(0.5 * (jax.nn.softplus(-g_cur) - jax.nn.softplus(-g_next)))
  alpha_next = schedules.alpha(g_next)
  return sigma_ratio * z - alpha_next * jnp.expm1(-h) * d, h


def ode_solve(eps_fn: EpsFn, gamma_fn: GammaFn, z: ArrayLike, times: ArrayLike, *,
              solver: str = "dpm_solver_2m") -> jax.Array:
  r"""Integrates the probability-flow ODE from times[0] to times[-1].

  Solvers (network evaluations per interval in brackets):
    "dpm_solver_2m" [1]: DPM-Solver++(2M) in log-SNR time (Lu et al. 2022b); the
      first step is first order.
    "heun" [2]: Heun's method on d xbar / d sigmabar = eps_hat (Karras et al.
      2022, Alg. 1 without churn): a DDIM predictor, then the step is redone with
      the mean of eps_hat at both ends.
    "euler" [1]: DDIM (eta = 0) / DPM-Solver-1.
  All three work for decreasing (sampling) and increasing (encoding) grids.

  Args:
    eps_fn: eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t [B] -> gamma [B].
    z: latent at times[0], [B, ...].
    times: [N + 1] strictly monotone grid in [0, 1], e.g. time_grid(N).
    solver: one of SOLVERS.

  Returns:
    latent at times[-1], shape of z.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  times = grid.check_times(times)
  z = jnp.asarray(z, jnp.float32)
  batch, num_steps = z.shape[0], times.shape[0] - 1

  def gammas(i):
    return grid.gamma_at(gamma_fn, times[i], batch), grid.gamma_at(gamma_fn, times[i + 1], batch)

  if solver == "dpm_solver_2m":
    def body(i, carry):
      z, x0_prev, h_prev = carry
      g_cur, g_next = gammas(i)
      x0 = weighted_losses.eps_to_x0(z, eps_fn(z, g_cur), g_cur)
      z, h = _dpm_solver_2m_update(z, x0, x0_prev, h_prev, g_cur, g_next, i == 0)
      return z, x0, h

    h0 = jnp.zeros((batch,) + (1,) * (z.ndim - 1), jnp.float32)
    return jax.lax.fori_loop(0, num_steps, body, (z, jnp.zeros_like(z), h0))[0]

  def body(i, z):
    g_cur, g_next = gammas(i)
    eps_hat = eps_fn(z, g_cur)
    z_euler = ddim.ddim_update(z, eps_hat, g_cur, g_next)
    if solver == "euler":
      return z_euler
    eps_next = eps_fn(z_euler, g_next)
    return ddim.ddim_update(z, 0.5 * (eps_hat + eps_next), g_cur, g_next)

  return jax.lax.fori_loop(0, num_steps, body, z)


def ode_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: PRNGKey, shape: Shape, *, num_steps: int = 25,
               solver: str = "dpm_solver_2m", times: ArrayLike | None = None) -> jax.Array:
  r"""Samples z_0 by solving the probability-flow ODE from z_1 ~ N(0, I).

  See `ode_solve` for the solvers; "heun" costs 2 * num_steps network calls.

  Args:
    eps_fn: eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t [B] -> gamma [B].
    key: PRNG key for z_1.
    shape: (B, H, W, C) (any (B, ...)).
    num_steps: N intervals of the uniform grid time_grid(N) (ignored when times is given).
    solver: "dpm_solver_2m" (default), "heun" or "euler".
    times: optional decreasing grid [M + 1] from 1 to 0 replacing the uniform one.

  Returns:
    z_0, float32 of `shape` (decode with vdm_jax.decoders.decode).
  """
  shape = grid.check_shape(shape)
  times = grid.grid_or_default(num_steps, times)
  z_1 = jax.random.normal(key, shape, jnp.float32)
  return ode_solve(eps_fn, gamma_fn, z_1, times, solver=solver)
