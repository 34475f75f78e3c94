"""Tests of vdm_jax.sampling / vdm_jax.ode against closed forms and the reference fixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import gaussian

from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture

GAMMA_FN = schedules.fixed_linear(-13.3, 5.0)
MU, STD, DIM, NUM = 0.3, 0.5, 2, 6000


def _fresh_key():
  return jax.random.PRNGKey(np.random.SeedSequence().entropy % (2**31))


def _moments(gamma):
  """alpha, sigma^2, and the variance v = alpha^2 STD^2 + sigma^2 of q(z_t) for Gaussian data."""
  gamma = np.float64(gamma)
  alpha2, sigma2 = 1 / (1 + np.exp(gamma)), 1 / (1 + np.exp(-gamma))
  return np.sqrt(alpha2), sigma2, alpha2 * STD**2 + sigma2


def _gaussian_targets(deterministic):
  """Mean and variance of the exact z_0 distribution each kind of sampler aims at.

  Stochastic samplers: q(z_0) = N(alpha_0 MU, v_0). Deterministic ones push z_1 ~ N(0, 1)
  through the exact probability-flow map z_0 = alpha_0 MU + sqrt(v_0 / v_1) (z_1 - alpha_1 MU)
  (the flow keeps (z_t - alpha_t MU) / sqrt(v_t) fixed), which includes the prior mismatch
  q(z_1) != N(0, I) of gamma_max = 5.
  """
  a0, _, v0 = _moments(GAMMA_FN(0.0))
  a1, _, v1 = _moments(GAMMA_FN(1.0))
  if deterministic:
    return a0 * MU - np.sqrt(v0 / v1) * a1 * MU, v0 / v1
  return a0 * MU, v0


# name -> (sampler at its default step count, deterministic?, allowed |relative variance error|
# from discretisation, measured at about 0.6 of these values).
SAMPLERS = {
    "ancestral_1000": (lambda e, k, s: sampling.ancestral_sample(e, GAMMA_FN, k, s), False, 0.0),
    "ddim_50": (lambda e, k, s: sampling.ddim_sample(e, GAMMA_FN, k, s), True, 0.12),
    "dpm_solver_2m_25": (lambda e, k, s: sampling.ode_sample(e, GAMMA_FN, k, s), True, 0.04),
    "heun_25": (lambda e, k, s: sampling.ode_sample(e, GAMMA_FN, k, s, solver="heun"), True, 0.08),
    # Langevin with target snr r inflates the stationary variance by about 1 / (1 - r^2) = +2.6%.
    "pc_1000": (lambda e, k, s: sampling.pc_sample(e, GAMMA_FN, k, s), False, 0.04),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_matches_gaussian_mean_and_variance(name):
  sampler, deterministic, allowance = SAMPLERS[name]
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z = np.asarray(jax.jit(lambda k: sampler(eps_fn, k, (NUM, DIM)))(_fresh_key()), np.float64)
  mean, var = _gaussian_targets(deterministic)
  n = z.size
  assert abs(z.mean() - mean) < 4 * np.sqrt(var / n) + allowance * abs(mean)
  assert abs(z.var() / var - 1) < 4 * np.sqrt(2 / n) + allowance


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_reproduces_mixture_component_weights(name):
  sampler = SAMPLERS[name][0]
  means, stds, weights = np.array([[-1.0, 0.5], [1.0, -0.5]]), np.array([0.3, 0.2]), np.array([0.3, 0.7])
  eps_fn = gaussian_mixture.mixture_eps_fn(means, stds, weights)
  z = np.asarray(jax.jit(lambda k: sampler(eps_fn, k, (NUM, 2)))(_fresh_key()))
  left = z[:, 0] < 0
  # 0.02 allowance: z_1 ~ N(0, I) instead of q(z_1) (whose mean is alpha_1 E[x] = 0.03) moves
  # about 0.013 of mass across the boundary for the deterministic samplers.
  assert abs(left.mean() - weights[0]) < 4 * np.sqrt(0.21 / NUM) + 0.02
  # Each component keeps its own spread (per-axis std), within 10%.
  np.testing.assert_allclose(z[left].std(0), stds[0], rtol=0.1)
  np.testing.assert_allclose(z[~left].std(0), stds[1], rtol=0.1)


def test_ancestral_step_with_true_noise_and_zero_noise_is_the_posterior_mean():
  key_f, key_eps, key_t = jax.random.split(_fresh_key(), 3)
  f = jax.random.uniform(key_f, (3, 4, 4, 2), minval=-1, maxval=1)
  eps = jax.random.normal(key_eps, f.shape)
  t, s = sorted(np.asarray(jax.random.uniform(key_t, (2,))), reverse=True)
  for gamma_fn in (schedules.fixed_linear(), schedules.cosine()):
    _check_step_is_posterior_mean(gamma_fn, f, eps, t, s)


def _check_step_is_posterior_mean(gamma_fn, f, eps, t, s):
  @jax.jit
  def step_and_posterior(f, eps):
    gamma_t = gamma_fn(jnp.full((3,), t))
    z_t = gaussian.sample_forward(f, gamma_t, eps)
    z_s = sampling.ancestral_step(lambda z, g: eps, gamma_fn, z_t, t, s, jnp.zeros_like(f))
    ones = sampling.ancestral_step(lambda z, g: eps, gamma_fn, z_t, t, s, jnp.ones_like(f))
    mean, var = gaussian.posterior(z_t, f, gamma_fn(jnp.full((3,), s)), gamma_t)
    return z_s, ones, mean, jnp.broadcast_to(jnp.sqrt(var), f.shape)

  z_s, ones, mean, std = step_and_posterior(f, eps)
  np.testing.assert_allclose(z_s, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ones - z_s, std, rtol=1e-4)


def test_ancestral_step_matches_the_reference_sample_step(reference_dir):
  inputs = np.load(reference_dir / "inputs.npz")
  out = np.load(reference_dir / "outputs_fixed.npz")
  num_steps, i = int(inputs["sample_T"]), int(inputs["sample_i"])
  t, s = sampling.time_grid(num_steps)[i], sampling.time_grid(num_steps)[i + 1]
  assert float(t) == float(out["sample_t"]) and float(s) == float(out["sample_s"])
  seen = []

  def eps_fn(z, gamma):
    seen.append(gamma)
    return jnp.asarray(out["sample_eps_hat"])

  z_s = sampling.ancestral_step(eps_fn, schedules.fixed_linear(-13.3, 5.0), jnp.asarray(inputs["sample_z_t"]),
                                t, s, jnp.asarray(out["sample_noise"]))
  np.testing.assert_allclose(seen[0], np.full(4, out["sample_g_t"]), rtol=1e-6)
  np.testing.assert_allclose(z_s, out["sample_z_s"], atol=1e-5)


def test_ancestral_step_on_a_beta_schedule_is_ddpm_algorithm_2():
  num_steps = 20
  betas = np.asarray(schedules.ddpm_betas("linear", num_steps, beta_start=1e-3, beta_end=0.2))
  gamma_fn = schedules.from_betas(betas)
  abar = np.cumprod(1 - betas)
  key_z, key_e, key_n = jax.random.split(_fresh_key(), 3)
  x_t, eps, noise = (jax.random.normal(k, (2, 3, 3, 1)) for k in (key_z, key_e, key_n))
  for i in (2, 9, 20):  # DDPM step i: x_i -> x_{i-1}, t = i / T (i = 1 ends at the bridge's gamma(0))
    expected = (x_t - betas[i - 1] / np.sqrt(1 - abar[i - 1]) * eps) / np.sqrt(1 - betas[i - 1])
    expected = expected + np.sqrt(betas[i - 1]) * noise
    got = sampling.ancestral_step(lambda z, g: eps, gamma_fn, x_t, i / num_steps, (i - 1) / num_steps, noise,
                                  variance="transition")
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_ddim_with_eta_one_is_the_ancestral_step():
  keys = jax.random.split(_fresh_key(), 3)
  z_t, eps_hat, noise = (jax.random.normal(k, (4, 5)) for k in keys)
  g_t, g_s = GAMMA_FN(jnp.full((4,), 0.6)), GAMMA_FN(jnp.full((4,), 0.55))
  anc = sampling.ancestral_step(lambda z, g: eps_hat, GAMMA_FN, z_t, 0.6, 0.55, noise)
  np.testing.assert_allclose(sampling.ddim_step(z_t, eps_hat, g_t, g_s, noise, eta=1.0), anc, rtol=1e-5, atol=1e-6)


def test_ddim_with_eta_zero_is_deterministic_and_ignores_step_noise():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  key = _fresh_key()
  sample = jax.jit(lambda k, eta: sampling.ddim_sample(eps_fn, GAMMA_FN, k, (16, DIM), num_steps=20, eta=eta))
  a, b = sample(key, 0.0), sample(key, 0.0)
  z_1 = jax.random.normal(jax.random.split(key)[0], (16, DIM))
  c = sampling.ddim_decode(eps_fn, GAMMA_FN, z_1, num_steps=20)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
  d = sample(key, 0.5)
  assert np.abs(np.asarray(d - a)).max() > 1e-3


@pytest.mark.parametrize("solver, num_steps, atol", [("euler", 200, 0.06), ("dpm_solver_2m", 50, 1e-3)])
def test_ddim_encode_then_decode_returns_the_input(solver, num_steps, atol):
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  a0, _, v0 = _moments(GAMMA_FN(0.0))
  z_0 = a0 * MU + np.sqrt(v0) * jax.random.normal(_fresh_key(), (64, DIM))
  z_1 = sampling.ddim_encode(eps_fn, GAMMA_FN, z_0, num_steps=num_steps, solver=solver)
  back = sampling.ddim_decode(eps_fn, GAMMA_FN, z_1, num_steps=num_steps, solver=solver)
  assert np.asarray(z_1).std() > 0.8  # it really went to noise (std of q(z_1) is ~1)
  np.testing.assert_allclose(back, z_0, atol=atol)  # stated errors: DDIM is O(1/N), DPM-Solver++ O(1/N^2)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("dpm_solver_2m", 2), ("heun", 2)])
def test_ode_solver_converges_to_the_exact_flow_at_its_order(solver, order):
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z_1 = jax.random.normal(_fresh_key(), (64, DIM))
  a0, _, v0 = _moments(GAMMA_FN(0.0))
  a1, _, v1 = _moments(GAMMA_FN(1.0))
  exact = a0 * MU + np.sqrt(v0 / v1) * (np.asarray(z_1, np.float64) - a1 * MU)
  errors = [np.abs(sampling.ode_solve(eps_fn, GAMMA_FN, z_1, sampling.time_grid(n), solver=solver) - exact).max()
            for n in (40, 80)]
  assert errors[1] / errors[0] < 0.5**order * 1.3


def test_ancestral_sample_keeps_x0_predictions_at_chosen_steps():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z_0, x0 = sampling.ancestral_sample(eps_fn, GAMMA_FN, _fresh_key(), (4000, DIM), num_steps=100,
                                      x0_steps=[0, 50, 99])
  assert x0.shape == (3, 4000, DIM)
  # At t = 1, x0_hat = E[x | z_1] = MU + alpha_1 STD^2 (z_1 - alpha_1 MU) / v_1: spread ~0.02 around MU.
  np.testing.assert_allclose(x0[0].mean(), MU, atol=0.01)
  assert float(x0[0].std()) < 0.03
  # At the last step it is ~ z_0 / alpha_0.
  np.testing.assert_allclose(x0[2], z_0 / _moments(GAMMA_FN(0.0))[0], atol=0.02)
  assert 0.1 < float(x0[1].std()) < STD


def test_to_data_decodes_a_noiseless_latent_to_the_integers():
  x = jax.random.randint(_fresh_key(), (2, 4, 4, 3), 0, 256)
  f = 2 * (x + 0.5) / 256 - 1
  z_0 = gaussian.forward_marginal(f, GAMMA_FN(0.0))[0]
  np.testing.assert_array_equal(jax.jit(lambda z: sampling.to_data(z, GAMMA_FN))(z_0), x)


def test_bad_options_raise_value_error():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="solver"):
    sampling.ode_sample(eps_fn, GAMMA_FN, key, (2, 2), solver="rk45")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.ancestral_sample(eps_fn, GAMMA_FN, key, (2, 2), num_steps=0)
  with pytest.raises(ValueError, match="shape"):
    sampling.ddim_sample(eps_fn, GAMMA_FN, key, (2,))
  with pytest.raises(ValueError, match="variance"):
    sampling.ancestral_sample(eps_fn, GAMMA_FN, key, (2, 2), variance="large")
  with pytest.raises(ValueError, match="monotone"):
    sampling.ddim_sample(eps_fn, GAMMA_FN, key, (2, 2), times=[1.0, 0.2, 0.5, 0.0])
