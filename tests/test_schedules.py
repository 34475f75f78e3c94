"""Tests of vdm_jax.schedules: gamma(t) factories, helpers and the DDPM beta bridge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import schedules
from seeding import seed_of

rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))


def test_alpha_sq_plus_sigma_sq_is_one_and_snr_is_exp_minus_gamma_for_gamma_in_pm30():
  gamma = np.sort(rng.uniform(-30, 30, 512)).astype(np.float32)

  @jax.jit
  def helpers(g):
    alpha, sigma = schedules.alpha_sigma(g)
    return alpha, sigma, schedules.alpha(g), schedules.sigma(g), schedules.snr(g), schedules.log_snr(g)

  alpha, sigma, alpha2, sigma2, snr, log_snr = helpers(gamma)
  np.testing.assert_allclose(np.square(alpha) + np.square(sigma), 1.0, rtol=0, atol=3e-7)
  g64 = gamma.astype(np.float64)
  np.testing.assert_allclose(np.square(alpha), 1 / (1 + np.exp(g64)), rtol=1e-6)
  np.testing.assert_allclose(np.square(sigma), 1 / (1 + np.exp(-g64)), rtol=1e-6)
  np.testing.assert_allclose(snr, np.exp(-g64), rtol=2e-6)
  np.testing.assert_allclose(np.square(alpha) / np.square(sigma), np.exp(-g64), rtol=5e-6)
  np.testing.assert_array_equal(alpha2, alpha)
  np.testing.assert_array_equal(sigma2, sigma)
  np.testing.assert_array_equal(log_snr, -gamma)


@pytest.mark.parametrize("factory", [schedules.fixed_linear, schedules.cosine])
def test_schedules_hit_their_endpoints_and_increase(factory):
  gamma_min, gamma_max = rng.uniform(-15, -5), rng.uniform(0, 10)
  gamma_fn = factory(gamma_min, gamma_max)
  t = jnp.linspace(0.0, 1.0, 201)
  gamma, dgamma = jax.jit(lambda t: jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),)))(t)
  np.testing.assert_allclose([gamma[0], gamma[-1]], [gamma_min, gamma_max], rtol=1e-5)
  assert np.all(np.diff(gamma) > 0) and np.all(dgamma > 0)


def test_cosine_is_two_log_tan_of_the_truncated_time_so_alphabar_is_cos_squared():
  gamma_min, gamma_max = -13.3, 5.0
  u_min, u_max = [2 / np.pi * np.arctan(np.exp(g / 2)) for g in (gamma_min, gamma_max)]
  t = rng.uniform(0, 1, 64)
  u = u_min + (u_max - u_min) * t
  gamma = schedules.cosine(gamma_min, gamma_max)(t.astype(np.float32))
  np.testing.assert_allclose(gamma, 2 * np.log(np.tan(np.pi * u / 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.nn.sigmoid(-gamma), np.cos(np.pi * u / 2)**2, rtol=1e-5)


def test_ddpm_beta_schedules_have_their_published_shapes():
  num_steps = int(rng.integers(5, 2000))
  linear = schedules.ddpm_betas("linear", num_steps)
  np.testing.assert_allclose([linear[0], linear[-1]], [1e-4, 0.02])
  np.testing.assert_allclose(np.diff(linear), (0.02 - 1e-4) / (num_steps - 1))
  quadratic = schedules.ddpm_betas("quadratic", num_steps)
  np.testing.assert_allclose(np.diff(np.sqrt(quadratic)), (0.02**0.5 - 1e-4**0.5) / (num_steps - 1))
  sigmoid = schedules.ddpm_betas("sigmoid", num_steps)
  assert np.all(np.diff(sigmoid) > 0) and 1e-4 < sigmoid[0] and sigmoid[-1] < 0.02
  np.testing.assert_allclose(sigmoid[::-1] - 1e-4, 0.02 - sigmoid, rtol=1e-9)  # symmetric ramp
  cosine = schedules.ddpm_betas("cosine", num_steps)
  abar = np.cumprod(1 - cosine)
  s = 0.008
  expected = np.cos((np.arange(1, num_steps + 1) / num_steps + s) / (1 + s) * np.pi / 2)**2 / np.cos(
      s / (1 + s) * np.pi / 2)**2
  unclipped = cosine < 0.999
  np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-9, atol=1e-12)


def test_gammas_from_betas_is_log_of_inverse_alphabar_minus_one_and_inverts_stably():
  betas = schedules.ddpm_betas("linear", 1000)
  abar = np.cumprod(1 - betas)
  gammas = schedules.gammas_from_betas(betas)
  np.testing.assert_allclose(gammas, np.log(1 / abar - 1), rtol=1e-9)
  np.testing.assert_allclose(schedules.betas_from_gammas(gammas), betas, rtol=1e-10)
  tiny = np.full(3, 1e-12)  # naive log(1/alphabar - 1) loses all digits here
  np.testing.assert_allclose(schedules.gammas_from_betas(tiny), np.log([1e-12, 2e-12, 3e-12]), rtol=1e-6)
  huge = np.full(50, 0.9)  # alphabar = 0.1^50 underflows nothing in log space
  np.testing.assert_allclose(schedules.gammas_from_betas(huge)[-1], -50 * np.log(0.1), rtol=1e-12)


def test_from_betas_passes_through_the_grid_and_extrapolates_gamma_at_zero():
  num_steps = int(rng.integers(2, 50))
  betas = schedules.ddpm_betas("cosine", num_steps)
  gammas = schedules.gammas_from_betas(betas)
  gamma_fn = schedules.from_betas(betas)
  grid = jnp.arange(num_steps + 1) / num_steps
  values = jax.jit(gamma_fn)(grid)
  np.testing.assert_allclose(values[1:], gammas, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(values[0], 2 * gammas[0] - gammas[1], rtol=1e-5)
  assert np.all(np.diff(values) > 0)
  np.testing.assert_allclose(schedules.from_betas(betas, gamma_0=-20.0)(0.0), -20.0)


def test_bad_schedule_arguments_raise_value_errors():
  with pytest.raises(ValueError, match="gamma_max > gamma_min"):
    schedules.fixed_linear(5.0, -5.0)
  with pytest.raises(ValueError, match="gamma_max > gamma_min"):
    schedules.cosine(1.0, 1.0)
  with pytest.raises(ValueError, match="kind must be"):
    schedules.ddpm_betas("exponential", 10)
  with pytest.raises(ValueError, match="num_steps"):
    schedules.ddpm_betas("linear", 0)
  with pytest.raises(ValueError, match="betas"):
    schedules.gammas_from_betas(np.array([0.1, 1.0]))
  with pytest.raises(ValueError, match="gamma_0"):
    schedules.from_betas(np.full(4, 0.1), gamma_0=10.0)
