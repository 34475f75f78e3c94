r"""Samplers for VDM / DDPM: ancestral, DDIM, predictor-corrector, and final decoding.

All samplers start from z_1 ~ N(0, I) of the given shape (B, H, W, C) and
return the latent z_0 (decode it with `to_data` / vdm_jax.decoders.decode).
They are pure JAX loops (lax.fori_loop) and can be wrapped in jax.jit as a
whole, keeping eps_fn / gamma_fn as closures over traced parameters:

  sample = jax.jit(lambda params, key: ancestral_sample(
      model.eps_fn(params), model.gamma_fn(params), key, (16, 32, 32, 3)))

`eps_fn(z_t, gamma_t)` maps z [B, ...] and gamma [B] to eps_hat [B, ...];
`gamma_fn(t)` maps [B] to [B] (gamma = -log SNR). Step i of N goes from
t = times[i] to s = times[i + 1] (t > s), by default t = (N - i) / N.
The probability-flow ODE solvers live in vdm_jax.ode (re-exported here).
"""
import jax
import jax.numpy as jnp

from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax import ode
from vdm_jax import schedules
from vdm_jax import weighted_losses
from vdm_jax.ode import ddim_update, ode_sample, ode_solve, time_grid  # noqa: F401 (re-exported)

VARIANCES = ("posterior", "transition")


def _ancestral_update(z_t, eps_hat, gamma_t, gamma_s, noise, variance):
  """The ancestral step written in gammas; see `ancestral_step`."""
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


def ancestral_step(eps_fn, gamma_fn, z_t, t, s, noise, *, variance="posterior"):
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
  gamma_t, gamma_s = ode.gamma_at(gamma_fn, t, batch), ode.gamma_at(gamma_fn, s, batch)
  return _ancestral_update(z_t, eps_fn(z_t, gamma_t), gamma_t, gamma_s, noise, variance)


def ancestral_sample(eps_fn, gamma_fn, key, shape, *, num_steps=1000, final_noise=True,
                     variance="posterior", times=None, x0_steps=None):
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
  shape, _ = ode.check_shape(shape), _check_variance(variance)
  times = time_grid(num_steps) if times is None else ode.check_times(times)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)
  last = times.shape[0] - 2
  steps = jnp.asarray([] if x0_steps is None else x0_steps, jnp.int32).reshape(-1)
  keep = jnp.zeros((steps.shape[0],) + shape, jnp.float32)

  def body(i, carry):
    z, keep = carry
    gamma_t = ode.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = ode.gamma_at(gamma_fn, times[i + 1], shape[0])
    eps_hat = eps_fn(z, gamma_t)
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
    if not final_noise:
      noise = jnp.where(i == last, 0.0, noise)
    if x0_steps is not None:
      x0_hat = weighted_losses.eps_to_x0(z, eps_hat, gamma_t)
      hit = (steps == i).reshape((-1,) + (1,) * len(shape))
      keep = jnp.where(hit, x0_hat[None], keep)
    return _ancestral_update(z, eps_hat, gamma_t, gamma_s, noise, variance), keep

  z, keep = jax.lax.fori_loop(0, times.shape[0] - 1, body, (z, keep))
  return z if x0_steps is None else (z, keep)


def ddpm_sample(eps_fn, gamma_fn, key, shape, *, num_steps, variance="transition"):
  r"""DDPM Algorithm 2 (Ho et al. 2020) as ancestral sampling on the T-step grid.

  On the grid t_i = i / T with alpha_bar_i = sigmoid(-gamma(t_i)) and
  beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}, the ancestral step is exactly
    x_{i-1} = (x_i - beta_i / sqrt(1 - alpha_bar_i) eps_hat) / sqrt(1 - beta_i) + sigma_i noise
  with sigma_i^2 = beta_i (variance="transition") or beta-tilde_i ("posterior"),
  and no noise on the last step. Use a gamma_fn built from the betas (the
  vdm_jax.schedules bridge) and num_steps = T.

  Returns:
    x_0 latent, float32 of `shape`.
  """
  return ancestral_sample(eps_fn, gamma_fn, key, shape, num_steps=num_steps,
                          final_noise=False, variance=variance)


def ddim_step(z_t, eps_hat, gamma_t, gamma_s, noise, *, eta=0.0):
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
  sigma_s = jnp.sqrt(jax.nn.sigmoid(g_s))
  # sqrt(1 - v) - 1 = -v / (1 + sqrt(1 - v)), no cancellation for small v.
  shrink = -var_eta / (1.0 + jnp.sqrt(1.0 - var_eta))
  return z_s + sigma_s * (shrink * eps_hat + jnp.sqrt(var_eta) * noise)


def ddim_sample(eps_fn, gamma_fn, key, shape, *, num_steps=50, eta=0.0, times=None):
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
  shape = ode.check_shape(shape)
  if not isinstance(eta, jax.Array) and not eta >= 0:
    raise ValueError(f"eta must be >= 0, got {eta!r}")
  times = time_grid(num_steps) if times is None else ode.check_times(times)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)

  def body(i, z):
    gamma_t = ode.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = ode.gamma_at(gamma_fn, times[i + 1], shape[0])
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
    return ddim_step(z, eps_fn(z, gamma_t), gamma_t, gamma_s, noise, eta=eta)

  return jax.lax.fori_loop(0, times.shape[0] - 1, body, z)


def ddim_encode(eps_fn, gamma_fn, z, *, t_start=0.0, t_end=1.0, num_steps=50, solver="euler"):
  r"""Deterministic DDIM encoder: integrates the probability-flow ODE upwards, z_{t_start} -> z_{t_end}.

  With solver="euler" (DDIM, Song et al. 2021, sec. 4.3) step i uses eps_hat at the
  current point, z <- ddim_update(z, eps_hat, gamma_i, gamma_{i+1}); `ddim_decode` on
  the same grid inverts it up to the O(1/N) discretisation error (about 0.03 max
  abs at N = 200 for unit-scale data). The second-order solvers of vdm_jax.ode
  ("dpm_solver_2m", "heun") invert far more accurately (about 1e-4 at N = 50).
  For an image, start from z_0 = alpha_0 f.

  Args:
    eps_fn, gamma_fn: as in `ddim_sample`.
    z: latent at t_start, [B, ...].
    t_start < t_end: times in [0, 1].
    num_steps: N intervals.
    solver: "euler" (DDIM), "dpm_solver_2m" or "heun".

  Returns:
    z at t_end, shape of z.
  """
  if not 0.0 <= t_start < t_end <= 1.0:
    raise ValueError(f"ddim_encode needs 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
  times = time_grid(num_steps, t_start=t_end, t_end=t_start)[::-1]
  return ode_solve(eps_fn, gamma_fn, z, times, solver=solver)


def ddim_decode(eps_fn, gamma_fn, z, *, t_start=1.0, t_end=0.0, num_steps=50, solver="euler"):
  """Deterministic DDIM decoder (eta = 0) from z at t_start down to t_end; inverse of `ddim_encode`."""
  if not 0.0 <= t_end < t_start <= 1.0:
    raise ValueError(f"ddim_decode needs 0 <= t_end < t_start <= 1, got {t_start}, {t_end}")
  times = time_grid(num_steps, t_start=t_start, t_end=t_end)
  return ode_solve(eps_fn, gamma_fn, z, times, solver=solver)


def _langevin(eps_fn, z, gamma, key, num_corrector_steps, snr):
  r"""Langevin corrector at fixed gamma (Song et al. 2021, Alg. 5).

  score = -eps_hat / sigma; step = 2 (snr ||noise|| / ||score||)^2 with norms
  averaged over the batch; z <- z + step score + sqrt(2 step) noise.
  """
  sigma = jnp.sqrt(jax.nn.sigmoid(gaussian.broadcast_to_data(gamma, z.ndim)))

  def norm(v):
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1)))

  def body(j, z):
    score = -eps_fn(z, gamma) / sigma
    noise = jax.random.normal(jax.random.fold_in(key, j), z.shape, jnp.float32)
    step = 2.0 * jnp.square(snr * norm(noise) / norm(score))
    return z + step * score + jnp.sqrt(2.0 * step) * noise

  return jax.lax.fori_loop(0, num_corrector_steps, body, z)


def pc_sample(eps_fn, gamma_fn, key, shape, *, num_steps=1000, corrector_steps=1, snr=0.16,
              predictor="ancestral"):
  r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1 / 3 / 5).

  Each step i: the predictor moves t -> s (an `ancestral_step`, or nothing when
  predictor="none", which gives annealed Langevin dynamics on the grid), then
  `corrector_steps` Langevin steps at s with score -eps_hat / sigma_s and the
  step size set by the target signal-to-noise ratio `snr`.

  Args:
    eps_fn, gamma_fn, key, shape: as in `ancestral_sample`.
    num_steps: N grid intervals; network calls N (1 + corrector_steps).
    corrector_steps: Langevin steps per grid point, >= 0.
    snr: target signal-to-noise ratio r > 0 of the Langevin step.
    predictor: "ancestral" or "none".

  Returns:
    z_0, float32 of `shape`.
  """
  shape = ode.check_shape(shape)
  if predictor not in ("ancestral", "none"):
    raise ValueError(f"predictor must be 'ancestral' or 'none', got {predictor!r}")
  if not (isinstance(corrector_steps, int) and corrector_steps >= 0) or not snr > 0:
    raise ValueError(f"need corrector_steps int >= 0 and snr > 0, got {corrector_steps!r}, {snr!r}")
  times = time_grid(num_steps)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)

  def body(i, z):
    key_p, key_c = jax.random.split(jax.random.fold_in(key_steps, i))
    gamma_t = ode.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = ode.gamma_at(gamma_fn, times[i + 1], shape[0])
    if predictor == "ancestral":
      noise = jax.random.normal(key_p, shape, jnp.float32)
      z = _ancestral_update(z, eps_fn(z, gamma_t), gamma_t, gamma_s, noise, "posterior")
    return _langevin(eps_fn, z, gamma_s, key_c, corrector_steps, snr)

  return jax.lax.fori_loop(0, num_steps, body, z)


def to_data(z_0, gamma_fn, *, key=None, vocab_size=256):
  r"""Final decoding of a sampled z_0 to integers with the VDM categorical decoder.

  x = argmax_v p(x = v | z_0) (key None, the reference's generate_x) or a sample.

  Args:
    z_0: [B, H, W, C] latent at t = 0.
    gamma_fn: t [B] -> gamma [B]; gamma_0 = gamma_fn(0).
    key: optional PRNG key for sampling instead of argmax.
    vocab_size: V.

  Returns:
    int32 [B, H, W, C] in {0, ..., V - 1}.
  """
  gamma_0 = ode.gamma_at(gamma_fn, 0.0, z_0.shape[0])
  return decoders.decode(z_0, gamma_0, key=key, vocab_size=vocab_size)
