"""Tests of vdm_jax.gaussian: forward process, transitions, posterior and KLs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import gaussian
from vdm_jax import schedules
from seeding import seed_of

rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))


def _sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _ordered_gammas(low, high, size, min_gap=0.05):
  a, b = rng.uniform(low, high, size), rng.uniform(low, high, size)
  gamma_s, gamma_t = np.minimum(a, b), np.maximum(a, b) + min_gap
  return gamma_s.astype(np.float32), gamma_t.astype(np.float32)


def test_forward_marginal_and_sample_have_the_vdm_mean_and_variance():
  f = rng.uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
  eps = rng.standard_normal(f.shape).astype(np.float32)
  gamma = rng.uniform(-10, 10, 3).astype(np.float32)
  mean, var = jax.jit(gaussian.forward_marginal)(f, gamma)
  z = jax.jit(gaussian.sample_forward)(f, gamma, eps)
  g = gamma[:, None, None, None]
  np.testing.assert_allclose(mean, np.sqrt(_sigmoid64(-g)) * f, rtol=1e-6)
  np.testing.assert_allclose(var, _sigmoid64(g), rtol=1e-6)
  np.testing.assert_allclose(z, mean + np.sqrt(var) * eps, rtol=1e-5, atol=1e-6)


def test_q_zs_given_x_composed_with_q_zt_given_zs_is_q_zt_given_x_for_gamma_in_pm30():
  gamma_s, gamma_t = _ordered_gammas(-30, 30, 256)
  f = rng.uniform(-1, 1, 256).astype(np.float32)

  @jax.jit
  def composed(f, gamma_s, gamma_t):
    mean_s, var_s = gaussian.forward_marginal(f, gamma_s)
    alpha_ts, var_ts = gaussian.transition(gamma_s, gamma_t)
    mean_t, var_t = gaussian.forward_marginal(f, gamma_t)
    return alpha_ts * mean_s, alpha_ts**2 * var_s + var_ts, mean_t, var_t

  mean_c, var_c, mean_t, var_t = composed(f, gamma_s, gamma_t)
  np.testing.assert_allclose(mean_c, mean_t, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(var_c, var_t, rtol=1e-5)
  assert np.all(np.isfinite(var_c)) and np.all(np.asarray(var_c) > 0)


def test_posterior_equals_bayes_rule_in_float64():
  gamma_s, gamma_t = _ordered_gammas(-10, 10, 4, min_gap=0.1)
  f = rng.uniform(-1, 1, (4, 3, 3, 2)).astype(np.float32)
  z_t = rng.standard_normal(f.shape).astype(np.float32)
  mean, var = jax.jit(gaussian.posterior)(z_t, f, gamma_s, gamma_t)
  # Prior q(z_s | x) = N(a_s f, v_s), likelihood q(z_t | z_s) = N(a_ts z_s, v_ts).
  g_s, g_t = gamma_s.astype(np.float64)[:, None, None, None], gamma_t.astype(np.float64)[:, None, None, None]
  a_s, v_s = np.sqrt(_sigmoid64(-g_s)), _sigmoid64(g_s)
  a_t, v_t = np.sqrt(_sigmoid64(-g_t)), _sigmoid64(g_t)
  a_ts = a_t / a_s
  v_ts = v_t - a_ts**2 * v_s
  precision = 1 / v_s + a_ts**2 / v_ts
  expected_mean = (a_s * f / v_s + a_ts * z_t / v_ts) / precision
  np.testing.assert_allclose(var, np.broadcast_to(1 / precision, var.shape), rtol=1e-5)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5 * np.abs(expected_mean).max())


def test_vdm_posterior_agrees_with_ddpm_beta_form_on_the_grid():
  betas = schedules.ddpm_betas("linear", 1000)
  abar = np.cumprod(1 - betas)
  i = rng.integers(1, 1000, 64)  # 0-based index of step i+1 >= 2
  # Ho et al. eq. 7: mu-tilde = c_x0 x_0 + c_xt x_t, beta-tilde.
  c_x0 = np.sqrt(abar[i - 1]) * betas[i] / (1 - abar[i])
  c_xt = np.sqrt(1 - betas[i]) * (1 - abar[i - 1]) / (1 - abar[i])
  beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * betas[i]
  # float64 so that the comparison tests the formulas, not float32 rounding of gamma.
  with jax.enable_x64(True):
    gammas = jnp.asarray(schedules.gammas_from_betas(betas))
    post = jax.jit(gaussian.posterior)
    ones, zeros = jnp.ones((64, 1, 1, 1)), jnp.zeros((64, 1, 1, 1))
    coef_xt, var = post(ones, zeros, gammas[i - 1], gammas[i])
    coef_x0, _ = post(zeros, ones, gammas[i - 1], gammas[i])
  np.testing.assert_allclose(np.ravel(coef_x0), c_x0, rtol=1e-10)
  np.testing.assert_allclose(np.ravel(coef_xt), c_xt, rtol=1e-10)
  np.testing.assert_allclose(np.ravel(var), beta_tilde, rtol=1e-10)


@pytest.mark.parametrize("params", [(0.3, 0.5, -0.4, 1.7), (1.0, 2.0, 0.0, 0.6), (-2.0, 0.01, 1.0, 3.0)])
def test_analytic_kl_equals_monte_carlo_within_four_standard_errors(params):
  mean_q, var_q, mean_p, var_p = params
  num = 200_000
  z = mean_q + np.sqrt(var_q) * jax.random.normal(jax.random.PRNGKey(rng.integers(2**31)), (num,))
  log_ratio = (-0.5 * np.log(var_q) - 0.5 * (z - mean_q)**2 / var_q) - (-0.5 * np.log(var_p) - 0.5 *
                                                                          (z - mean_p)**2 / var_p)
  kl = jax.jit(gaussian.kl_normal)(mean_q, var_q, mean_p, var_p)
  assert abs(kl - np.mean(log_ratio)) < 4 * np.std(log_ratio) / np.sqrt(num)


def test_kl_of_a_distribution_with_itself_is_zero_and_kls_are_stable_at_extremes():
  mean = rng.standard_normal(16).astype(np.float32)
  var = np.exp(rng.uniform(-30, 30, 16)).astype(np.float32)
  np.testing.assert_array_equal(gaussian.kl_normal(mean, var, mean, var), 0.0)
  # Nearly equal variances: r - 1 - log r ~ (r-1)^2/2 must not cancel to 0 or go negative.
  kl = gaussian.kl_normal(0.0, 1.0 + 1e-3, 0.0, 1.0)
  np.testing.assert_allclose(kl, 0.5 * (1e-3 - np.log1p(1e-3)), rtol=1e-4)


def test_kl_to_standard_normal_from_gamma_is_accurate_for_gamma_in_pm30():
  gamma = np.linspace(-30, 30, 121).astype(np.float32)
  f = rng.uniform(-1, 1, (121, 1, 1, 1)).astype(np.float32)
  kl = np.ravel(jax.jit(gaussian.kl_to_standard_normal_from_gamma)(f, gamma))
  g = gamma.astype(np.float64)
  alpha2 = _sigmoid64(-g)
  # d = sigma^2 - 1 - log sigma^2 = -log(1 - alpha^2) - alpha^2, as sum_k alpha^(2k)/k for small alpha^2.
  series = sum(alpha2**k / k for k in range(2, 40))
  d = np.where(alpha2 < 0.1, series, np.logaddexp(0.0, -g) - alpha2)
  expected = 0.5 * (alpha2 * np.ravel(f)**2 + d)
  np.testing.assert_allclose(kl, expected, rtol=2e-6)
  np.testing.assert_allclose(np.ravel(gaussian.kl_to_standard_normal(np.sqrt(alpha2) * np.ravel(f), 1 - alpha2))[:60],
                             expected[:60], rtol=1e-4)


def test_broadcast_rejects_gamma_of_higher_rank_than_the_data():
  with pytest.raises(ValueError, match="rank"):
    gaussian.forward_marginal(jnp.zeros((2, 3)), jnp.zeros((2, 3, 1)))
