"""Samplers step by step against their papers' algorithms, written out here in float64 numpy.

DDIM's generalised step (Song et al. 2021, eqs. 12 and 16), DPM-Solver++(2M) (Lu et al.
2022b, Algorithm 2) on a non-uniform grid, the predictor-corrector Langevin loop (Song et
al. 2021, Alg. 5 as documented in vdm_jax.sampling.pc), every sampler's `times=` grid, and
the last ancestral step without noise. Each sampler's noise is drawn as its docstring says.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture

SEED = 1605
GAMMA_FN = schedules.fixed_linear(-13.3, 5.0)
MEANS, STDS, WEIGHTS = np.array([[-1.0, 0.5], [1.0, -0.5]]), np.array([0.3, 0.2]), np.array([0.3, 0.7])
EPS_FN = gaussian_mixture.mixture_eps_fn(MEANS, STDS, WEIGHTS)
# A non-uniform grid: steps of 0.03 to 0.28 in t, so consecutive log-SNR steps differ.
TIMES = np.array([1.0, 0.9, 0.62, 0.5, 0.31, 0.2, 0.07, 0.0])


def _gamma(t):
  """gamma(t) of the fixed linear schedule, float64."""
  return -13.3 + (5.0 + 13.3) * np.asarray(t, np.float64)


def _abar(gamma):
  return 1.0 / (1.0 + np.exp(gamma))  # alpha^2 = sigmoid(-gamma)


def _eps_np(z, gamma):
  """The mixture's optimal eps_hat (vdm_jax.testing.gaussian_mixture's formula) in float64."""
  a2, s2 = _abar(gamma), 1.0 - _abar(gamma)
  v = a2 * STDS**2 + s2                                     # [K]
  diff = z[:, None, :] - np.sqrt(a2) * MEANS                # [B, K, D]
  logits = np.log(WEIGHTS) - np.log(v) - 0.5 * np.sum(diff**2, -1) / v
  resp = np.exp(logits - logits.max(-1, keepdims=True))
  resp /= resp.sum(-1, keepdims=True)
  return np.sqrt(s2) * np.einsum("bk,bkd->bd", resp / v, diff)


def _z1(rng, num=16):
  return rng.standard_normal((num, 2)).astype(np.float32)


@pytest.mark.parametrize("eta", [0.5, 0.2, 1.0, 0.0])
def test_ddim_step_is_song_et_al_equation_12_with_the_eta_variance_of_equation_16(eta):
  """x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_eta^2) eps_hat + sigma_eta noise,
  sigma_eta^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)."""
  rng = np.random.default_rng(SEED)
  z_t, eps_hat, noise = (rng.standard_normal((6, 3)).astype(np.float32) for _ in range(3))
  gamma_t = rng.uniform(-6.0, 4.0, 6).astype(np.float32)
  gamma_s = (gamma_t - rng.uniform(0.05, 3.0, 6)).astype(np.float32)
  got = sampling.ddim_step(jnp.asarray(z_t), jnp.asarray(eps_hat), jnp.asarray(gamma_t),
                           jnp.asarray(gamma_s), jnp.asarray(noise), eta=eta)
  a_t, a_s = _abar(gamma_t.astype(np.float64))[:, None], _abar(gamma_s.astype(np.float64))[:, None]
  x0_hat = (z_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t)
  var_eta = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
  expected = np.sqrt(a_s) * x0_hat + np.sqrt(1 - a_s - var_eta) * eps_hat + np.sqrt(var_eta) * noise
  # float32: x0_hat divides by sqrt(abar_t) >= 0.08, so its rounding is <= ~20 ulp of |z| <= 4;
  # times sqrt(abar_s) <= 1: 1e-5 absolute.
  np.testing.assert_allclose(got, expected, atol=1e-5)


def _dpm_solver_2m(z, times):
  """Lu et al. 2022b, Algorithm 2 (DPM-Solver++(2M)), lambda = log(alpha / sigma) = -gamma / 2.

  x_1 = (sigma_1 / sigma_0) x_0 - alpha_1 (e^-h_1 - 1) x_theta(x_0, t_0);
  for i >= 2: r_i = h_{i-1} / h_i, D_i = (1 + 1 / (2 r_i)) x_theta(x_{i-1}) - 1 / (2 r_i) x_theta(x_{i-2}),
  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^-h_i - 1) D_i. Returns every x_i.
  """
  gammas = _gamma(times)
  alpha, sigma, lam = np.sqrt(_abar(gammas)), np.sqrt(1 - _abar(gammas)), -gammas / 2
  x, x0_prev, h_prev, out = z.astype(np.float64), None, None, []
  for i in range(1, len(times)):
    x0 = (x - sigma[i - 1] * _eps_np(x, gammas[i - 1])) / alpha[i - 1]   # data prediction
    h = lam[i] - lam[i - 1]
    if x0_prev is None:
      d = x0
    else:
      r = h_prev / h
      d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    x = sigma[i] / sigma[i - 1] * x - alpha[i] * np.expm1(-h) * d
    x0_prev, h_prev = x0, h
    out.append(x)
  return out


def test_dpm_solver_2m_follows_lu_et_al_algorithm_2_step_by_step_on_a_non_uniform_grid():
  z_1 = _z1(np.random.default_rng(SEED + 1))
  expected = _dpm_solver_2m(z_1, TIMES)
  h = np.diff(-_gamma(TIMES) / 2)
  assert np.ptp(h[1:] / h[:-1]) > 1.0  # step ratios r far from 1: r and 1 / r differ
  solve = jax.jit(lambda z, times: sampling.ode_solve(EPS_FN, GAMMA_FN, z, times))
  for k in range(1, len(TIMES)):  # the first k steps (a prefix of the grid) give x_k
    got = solve(jnp.asarray(z_1), jnp.asarray(TIMES[:k + 1], jnp.float32))
    # float32: each step rounds at a few ulp of |x| <= 3, the sigma ratio (< 1) does not
    # amplify it and the x0 terms carry it at most e^|h| <= 4 times: 2e-5 over 7 steps.
    np.testing.assert_allclose(got, expected[k - 1], atol=2e-5, err_msg=f"step {k}")


def _steps_keys(key):
  """(z_1, key of the steps) as every sampler documents: z_1 from split(key)[0]."""
  key_init, key_steps = jax.random.split(key)
  return jax.random.normal(key_init, (16, 2), jnp.float32), key_steps


@pytest.mark.parametrize("variance", ["posterior", "transition"])
def test_ancestral_sample_on_given_times_is_its_step_on_that_grid(variance):
  key = jax.random.PRNGKey(SEED)
  got = sampling.ancestral_sample(EPS_FN, GAMMA_FN, key, (16, 2), times=TIMES, variance=variance)
  z, key_steps = _steps_keys(key)
  for i in range(len(TIMES) - 1):
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), z.shape)
    z = sampling.ancestral_step(EPS_FN, GAMMA_FN, z, TIMES[i], TIMES[i + 1], noise,
                                variance=variance)
  np.testing.assert_allclose(got, z, atol=1e-5)  # same float32 ops, fused differently


def test_ddim_sample_on_given_times_is_equation_12_on_that_grid():
  key, eta = jax.random.PRNGKey(SEED + 2), 0.5
  got = sampling.ddim_sample(EPS_FN, GAMMA_FN, key, (16, 2), times=TIMES, eta=eta)
  z, key_steps = _steps_keys(key)
  z = np.asarray(z, np.float64)
  gammas = _gamma(TIMES)
  for i in range(len(TIMES) - 1):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key_steps, i), z.shape), np.float64)
    a_t, a_s = _abar(gammas[i]), _abar(gammas[i + 1])
    eps_hat = _eps_np(z, gammas[i])
    x0_hat = (z - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t)
    var_eta = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    z = np.sqrt(a_s) * x0_hat + np.sqrt(1 - a_s - var_eta) * eps_hat + np.sqrt(var_eta) * noise
  # float32 rounding of ~1e-6 per step, 7 steps, the first ones divide by alpha_1 = 0.08.
  np.testing.assert_allclose(got, z, atol=1e-4)


@pytest.mark.parametrize("solver", ["dpm_solver_2m", "heun", "euler"])
def test_ode_sample_on_given_times_solves_from_its_z1_on_that_grid(solver):
  key = jax.random.PRNGKey(SEED + 3)
  got = sampling.ode_sample(EPS_FN, GAMMA_FN, key, (16, 2), times=TIMES, solver=solver)
  z_1 = jax.random.normal(key, (16, 2), jnp.float32)  # ode_sample: z_1 = normal(key)
  if solver == "dpm_solver_2m":
    expected = _dpm_solver_2m(np.asarray(z_1), TIMES)[-1]
  else:  # Euler = DDIM (eta 0); Heun redoes the step with the mean of both ends' eps_hat
    z = np.asarray(z_1, np.float64)
    gammas = _gamma(TIMES)
    for i in range(len(TIMES) - 1):
      step = lambda z, e: (np.sqrt(_abar(gammas[i + 1]) / _abar(gammas[i])) * z  # noqa: B023
                           - np.sqrt(1 - _abar(gammas[i + 1])) * np.expm1((gammas[i] - gammas[i + 1]) / 2) * e)  # noqa: B023
      eps_hat = _eps_np(z, gammas[i])
      z_next = step(z, eps_hat)
      z = z_next if solver == "euler" else step(z, 0.5 * (eps_hat + _eps_np(z_next, gammas[i + 1])))
    expected = z
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_ancestral_sample_without_final_noise_ends_at_the_last_steps_mean():
  """final_noise=False drops exactly the last step's sigma_0 sqrt(c) noise_{N-1} term."""
  key, num_steps = jax.random.PRNGKey(SEED + 4), 6
  sample = lambda final: sampling.ancestral_sample(EPS_FN, GAMMA_FN, key, (16, 2),
                                                   num_steps=num_steps, final_noise=final)
  with_noise, without = sample(True), sample(False)
  _, key_steps = _steps_keys(key)
  last_noise = jax.random.normal(jax.random.fold_in(key_steps, num_steps - 1), (16, 2))
  gamma_t, gamma_s = _gamma(1 / num_steps), _gamma(0.0)
  std = np.sqrt(-np.expm1(gamma_s - gamma_t) * (1 - _abar(gamma_s)))  # sqrt(c sigma_s^2)
  np.testing.assert_allclose(np.asarray(with_noise) - np.asarray(without), std * last_noise,
                             atol=1e-6)
  assert std > 1e-3  # the noise term is not negligible at gamma_0 = -13.3


def _langevin_np(z, gamma, keys, snr):
  """Alg. 5 as documented: score = -eps_hat / sigma, step = 2 (r ||noise|| / ||score||)^2 with
  the norms averaged over the batch, z <- z + step score + sqrt(2 step) noise."""
  sigma = np.sqrt(1 - _abar(gamma))
  for key in keys:
    noise = np.asarray(jax.random.normal(key, z.shape), np.float64)
    score = -_eps_np(z, gamma) / sigma
    norm = lambda v: np.mean(np.linalg.norm(v, axis=-1))
    step = 2 * (snr * norm(noise) / norm(score)) ** 2
    z = z + step * score + np.sqrt(2 * step) * noise
  return z


@pytest.mark.parametrize("predictor", ["none", "ancestral"])
def test_pc_sample_runs_its_predictor_then_several_langevin_steps_of_the_given_snr(predictor):
  key, num_steps, corrector_steps, snr = jax.random.PRNGKey(SEED + 5), 4, 3, 0.3
  got = sampling.pc_sample(EPS_FN, GAMMA_FN, key, (16, 2), num_steps=num_steps,
                           corrector_steps=corrector_steps, snr=snr, predictor=predictor)
  z, key_steps = _steps_keys(key)
  z = np.asarray(z, np.float64)
  times = np.arange(num_steps, -1, -1) / num_steps
  for i in range(num_steps):  # step i: split(fold_in(key_steps, i)) -> predictor, corrector keys
    key_p, key_c = jax.random.split(jax.random.fold_in(key_steps, i))
    g_t, g_s = _gamma(times[i]), _gamma(times[i + 1])
    if predictor == "ancestral":  # VDM eq. 33 with the posterior variance
      c = -np.expm1(g_s - g_t)
      mean = np.sqrt(_abar(g_s) / _abar(g_t)) * (z - np.sqrt(1 - _abar(g_t)) * c * _eps_np(z, g_t))
      noise = np.asarray(jax.random.normal(key_p, z.shape), np.float64)
      z = mean + np.sqrt(c * (1 - _abar(g_s))) * noise
    z = _langevin_np(z, g_s, [jax.random.fold_in(key_c, j) for j in range(corrector_steps)], snr)
  # float32 over 4 x (1 + 3) network calls; Langevin steps at small sigma amplify rounding
  # through the score's 1 / sigma (but step ~ sigma^2 cancels it): 1e-4.
  np.testing.assert_allclose(got, z, atol=1e-4)
