r"""Ancestral sampling (VDM, Kingma et al. 2021, eq. 33) and DDPM's Algorithm 2.

`eps_fn(z_t, gamma_t)` maps z [B, ...] and gamma [B] to eps_hat [B, ...];
`gamma_fn(t)` maps [B] to [B]. Samplers start from z_1 ~ N(0, I) and return z_0.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import gaussian
from vdm_jax import schedules
from vdm_jax import weighted_losses
from vdm_jax.sampling import grid
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Shape

VARIANCES: tuple[str, ...] = ("posterior", "transition")


def ancestral_update(z_t: jax.Array, eps_hat: ArrayLike, gamma_t: ArrayLike, gamma_s: ArrayLike,
                     noise: ArrayLike, variance: str) -> jax.Array:
  r"""The ancestral step of `ancestral_step` given eps_hat and the gammas (Kingma et al. 2021).

    z_s = (z_t - sigma_t c eps_hat) / alpha_{t|s} + sqrt(v) noise,
    c = -expm1(gamma_s - gamma_t),
    v = c sigma_s^2 (variance="posterior") or c sigma_t^2 (variance="transition").

  Args:
    z_t: latent at t, [B, ...].
    eps_hat: eps_fn(z_t, gamma_t), [B, ...].
    gamma_t, gamma_s: scalar or [B], gamma_s < gamma_t.
    noise: standard normal, shape of z_t.
    variance: "posterior" or "transition".

  Returns:
    z_s, shape of z_t.
  """
  g_t = gaussian.broadcast_to_data(gamma_t, z_t.ndim)
  g_s = gaussian.broadcast_to_data(gamma_s, z_t.ndim)
  c = -jnp.expm1(g_s - g_t)  # sigma_{t|s}^2 / sigma_t^2
  alpha_ts, var_ts = gaussian.transition(g_s, g_t)  # alpha_t / alpha_s, c sigma_t^2
  _, sigma_t = schedules.alpha_sigma(g_t)
  mean = (z_t - sigma_t * c * eps_hat) / alpha_ts
  var = c * jax.nn.sigmoid(g_s) if variance == "posterior" else var_ts
  return mean + jnp.sqrt(var) * noise


def _check_variance(variance):
  if variance not in VARIANCES:
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")


def ancestral_step(eps_fn: EpsFn, gamma_fn: GammaFn, z_t: jax.Array, t: ArrayLike,
                   s: ArrayLike, noise: ArrayLike, *, variance: str = "posterior") -> jax.Array:
  r"""One step of ancestral sampling p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)), s < t.

  With c = -expm1(gamma_s - gamma_t) and eps_hat = eps_fn(z_t, gamma_t) (Kingma et al.
  2021, eq. 33, as in the reference `VDM.sample`):
    z_s = sqrt(alpha_s^2 / alpha_t^2) (z_t - sigma_t c eps_hat) + sqrt(v) noise,
    v = sigma_s^2 c                (variance="posterior", beta-tilde of DDPM)
    v = sigma_t^2 c = sigma_{t|s}^2  (variance="transition", beta of DDPM)
  With the true eps and zero noise this is the posterior mean of q(z_s | z_t, x).

  Args:
    eps_fn: eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t [B] -> gamma [B].
    z_t: latent at time t, [B, ...].
    t, s: scalar times, 0 <= s < t <= 1.
    noise: standard normal, shape of z_t (zeros give the mean).
    variance: "posterior" (default) or "transition".

  Returns:
    z_s, shape of z_t.
  """
  _check_variance(variance)
  batch = z_t.shape[0]
  gamma_t, gamma_s = grid.gamma_at(gamma_fn, t, batch), grid.gamma_at(gamma_fn, s, batch)
  return ancestral_update(z_t, eps_fn(z_t, gamma_t), gamma_t, gamma_s, noise, variance)


def ancestral_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: PRNGKey, shape: Shape, *,
                     num_steps: int = 1000, final_noise: bool = True, variance: str = "posterior",
                     times: ArrayLike | None = None,
                     x0_steps: Sequence[int] | ArrayLike | None = None
                     ) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Ancestral sampling z_1 -> z_0 with `ancestral_step` on a time grid.

  z_1 ~ N(0, I) uses split(key)[0]; step i draws noise_i = normal(fold_in(k, i))
  with k = split(key)[1]. As in the reference, noise is added on every step,
  including the last one (s = 0), so the output is a sample of p(z_0), whose
  variance includes sigma_0^2. With final_noise=False the last step returns its
  mean (DDPM Algorithm 2, see `ddpm_sample`).

  Args:
    eps_fn: eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t [B] -> gamma [B].
    key: PRNG key.
    shape: (B, H, W, C) (any (B, ...)).
    num_steps: N; grid t_i = (N - i) / N (ignored when times is given).
    final_noise: add noise on the last step (True, reference behaviour).
    variance: "posterior" (sigma_s^2 c) or "transition" (sigma_t^2 c).
    times: optional decreasing grid [M + 1] from 1 to 0.
    x0_steps: optional sequence of step indices i; for each the prediction
      x0_hat = (z_t - sigma_t eps_hat) / alpha_t at the start of step i is kept
      (progressive generation, Ho et al. 2020 fig. 6).

  Returns:
    z_0 [shape], or (z_0, x0_hat [len(x0_steps), *shape]) when x0_steps is given.
  """
  shape, _ = grid.check_shape(shape), _check_variance(variance)
  times = grid.grid_or_default(num_steps, times)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)
  last = times.shape[0] - 2
  steps = jnp.asarray([] if x0_steps is None else x0_steps, jnp.int32).reshape(-1)
  keep = jnp.zeros((steps.shape[0],) + shape, jnp.float32)

  def body(i, carry):
    z, keep = carry
    gamma_t = grid.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = grid.gamma_at(gamma_fn, times[i + 1], shape[0])
    eps_hat = eps_fn(z, gamma_t)
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
    if not final_noise:
      noise = jnp.where(i == last, 0.0, noise)
    if x0_steps is not None:
      x0_hat = weighted_losses.eps_to_x0(z, eps_hat, gamma_t)
      hit = (steps == i).reshape((-1,) + (1,) * len(shape))
      keep = jnp.where(hit, x0_hat[None], keep)
    return ancestral_update(z, eps_hat, gamma_t, gamma_s, noise, variance), keep

  z, keep = jax.lax.fori_loop(0, times.shape[0] - 1, body, (z, keep))
  return z if x0_steps is None else (z, keep)


def ddpm_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: PRNGKey, shape: Shape, *, num_steps: int,
                variance: str = "transition") -> jax.Array:
  r"""DDPM Algorithm 2 (Ho et al. 2020) as ancestral sampling on the T-step grid.

  On the grid t_i = i / T with alpha_bar_i = sigmoid(-gamma(t_i)) and
  beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}, the ancestral step is exactly
    x_{i-1} = (x_i - beta_i / sqrt(1 - alpha_bar_i) eps_hat) / sqrt(1 - beta_i) + sigma_i noise
  with sigma_i^2 = beta_i (variance="transition") or beta-tilde_i ("posterior"),
  and no noise on the last step. Use a gamma_fn built from the betas (the
  vdm_jax.schedules bridge) and num_steps = T.

  Args:
    eps_fn, gamma_fn, key, shape: as in `ancestral_sample`.
    num_steps: T, the steps of the grid t_i = i / T.
    variance: "transition" (sigma_i^2 = beta_i, default) or "posterior" (beta-tilde_i).

  Returns:
    x_0 latent, float32 of `shape`.
  """
  return ancestral_sample(eps_fn, gamma_fn, key, shape, num_steps=num_steps,
                          final_noise=False, variance=variance)
