"""vdm_jax.ddpm and ddpm_sample against Ho et al. 2020 written out here in float64 numpy.

Every expected value below is computed from the betas with the paper's formulas (eqs. 4-7,
the discretised decoder of sec. 3.3 as a numerical integral, Algorithm 2), not with the
library's gamma tables, posterior or KL helpers.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from vdm_jax import ddpm
from vdm_jax import sampling
from vdm_jax import schedules

SEED = 1601
T = 20
# Large steps (beta up to 0.2): beta_i and beta-tilde_i differ by up to 2x, so "small" and
# "large" give clearly different bounds.
BETAS = schedules.ddpm_betas("linear", T, beta_start=1e-3, beta_end=0.2)
ABAR = np.cumprod(1.0 - BETAS)                          # alphabar_i, i = 1..T
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])          # alphabar_{i-1}
BETA_TILDE = (1.0 - ABAR_PREV) / (1.0 - ABAR) * BETAS   # eq. 7
GAMMAS = np.log(1.0 / ABAR - 1.0)                       # what eps_fn receives: log(1/abar - 1)


def _eps_fn(z, gamma):
  """A nonlinear-in-gamma noise model: 0.6 z + 0.1 tanh(gamma)."""
  return 0.6 * z + 0.1 * jnp.tanh(gamma).reshape((-1,) + (1,) * (z.ndim - 1))


def _eps_fn_np(z, gamma):
  return 0.6 * z + 0.1 * np.tanh(np.reshape(gamma, (-1,) + (1,) * (z.ndim - 1)))


def _data(rng, batch):
  """uint8-range data including both edge values (their bins reach -inf / +inf)."""
  x = rng.integers(0, 256, (batch, 2, 2, 1))
  x[0, 0, 0, 0], x[-1, 0, 0, 0] = 0, 255
  return x


def _x0(x):
  return x.astype(np.float64) / 127.5 - 1.0


def _x0_hat(x_i, i):
  """Ho et al. eq. 15 / 11: x0_hat = (x_i - sqrt(1 - abar_i) eps_theta) / sqrt(abar_i); i is 1-based."""
  eps_hat = _eps_fn_np(x_i, GAMMAS[i - 1])
  return (x_i - np.sqrt(1.0 - ABAR[i - 1]) * eps_hat) / np.sqrt(ABAR[i - 1])


def _mu_tilde(x_i, x0, i):
  """Eq. 7: posterior mean of x_{i-1} given x_i and x_0."""
  return (np.sqrt(ABAR_PREV[i - 1]) * BETAS[i - 1] / (1.0 - ABAR[i - 1]) * x0
          + np.sqrt(1.0 - BETAS[i - 1]) * (1.0 - ABAR_PREV[i - 1]) / (1.0 - ABAR[i - 1]) * x_i)


def _kl_term(x0, eps, i, variance):
  """L_{i-1} = KL(q(x_{i-1} | x_i, x_0) || N(mu_theta, sigma_i^2)), i >= 2, summed per example."""
  x_i = np.sqrt(ABAR[i - 1]) * x0 + np.sqrt(1.0 - ABAR[i - 1]) * eps   # eq. 4
  var_q = BETA_TILDE[i - 1]
  var_p = BETA_TILDE[i - 1] if variance == "small" else BETAS[i - 1]
  diff = _mu_tilde(x_i, x0, i) - _mu_tilde(x_i, _x0_hat(x_i, i), i)
  kl = 0.5 * (np.log(var_p / var_q) + var_q / var_p + diff**2 / var_p - 1.0)
  return kl.reshape(len(x0), -1).sum(-1)


def _bin_mass(lower, upper, mean, std):
  """int_lower^upper N(u; mean, std^2) du by adaptive quadrature of the density itself."""
  lower, upper = max(lower, mean - 12 * std), min(upper, mean + 12 * std)  # beyond: < 1e-32
  density = lambda u: np.exp(-0.5 * ((u - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
  return integrate.quad(density, lower, upper, epsabs=0.0, epsrel=1e-11, limit=200)[0]


def _decoder_term(x, eps):
  """L_0 = -log p(x | x_1): the Gaussian N(x0_hat, sigma_1^2) integrated over the bin of each
  value, [x0 - 1/255, x0 + 1/255], widened to -inf at 0 and +inf at 255 (sec. 3.3, eq. 13).
  sigma_1^2 = beta-tilde_2, the decoder variance of Ho et al.'s code for both choices."""
  x0 = _x0(x)
  mean = _x0_hat(np.sqrt(ABAR[0]) * x0 + np.sqrt(1.0 - ABAR[0]) * eps, 1)
  std = np.sqrt(BETA_TILDE[1])
  lower = np.where(x == 0, -np.inf, x0 - 1.0 / 255)
  upper = np.where(x == 255, np.inf, x0 + 1.0 / 255)
  logp = np.log([_bin_mass(lo, up, m, std) for lo, up, m in
                 zip(lower.ravel(), upper.ravel(), mean.ravel(), strict=True)])
  return -logp.reshape(len(x), -1).sum(-1)


def _prior_term(x0):
  """L_T = KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)), summed per example."""
  a, v = ABAR[-1], 1.0 - ABAR[-1]
  return (0.5 * (a * x0**2 + v - np.log(v) - 1.0)).reshape(len(x0), -1).sum(-1)


def _expected_step_loss(x, steps, eps, variance):
  x0 = _x0(x)
  return np.array([_decoder_term(x[b:b + 1], eps[b:b + 1])[0] if i == 1 else
                   _kl_term(x0[b:b + 1], eps[b:b + 1], i, variance)[0]
                   for b, i in enumerate(steps)])


# float32 tolerance: the library stores gamma_i in float32 (0.5 ulp ~ 3e-8 |gamma_i|, about
# 2e-7 here) and the KL of step i scales like expm1(gamma_i - gamma_{i-1}) with gaps >= 0.2,
# a relative error <= 2e-6; the decoder's bin masses (~0.1 here) see x0_hat rounded by ~1e-7
# on a scale sigma_1 = 0.03, i.e. 3e-6 standard deviations, times |d log p / du| <= 3. So
# every term is good to ~1e-5 relative; 1e-4 leaves room for the remaining float32 ops.
RTOL = 1e-4


@pytest.mark.parametrize("variance", ["small", "large"])
def test_every_step_term_is_ho_et_al_equation_5_with_the_numerically_integrated_decoder(variance):
  rng = np.random.default_rng(SEED)
  steps = np.array([1, 1, 2, 3, 7, 12, 19, 20])  # step 1 is L_0, the others KL terms
  x = _data(rng, steps.size)
  eps = rng.standard_normal(x.shape)
  got = jax.jit(functools.partial(ddpm.ddpm_step_loss, _eps_fn, BETAS, variance=variance))(
      x, steps, eps.astype(np.float32))
  expected = _expected_step_loss(x, steps, eps.astype(np.float32).astype(np.float64), variance)
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  assert np.all(expected > 0)


def test_large_variance_costs_exactly_the_kl_of_the_variance_mismatch_more_than_small():
  """With the exact eps (x0_hat = x0, equal means) the small-variance KL is 0 and the large one
  KL(N(m, bt I) || N(m, b I)) = 0.5 D (log(b / bt) + bt / b - 1), a closed form of beta_i and
  beta-tilde_i alone."""
  rng = np.random.default_rng(SEED + 1)
  steps = np.arange(2, T + 1)
  x = _data(rng, steps.size)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  exact_eps_fn = lambda z, g: jnp.asarray(eps)  # x0_hat = x0: the means agree
  step_loss = lambda v: np.asarray(jax.jit(functools.partial(
      ddpm.ddpm_step_loss, exact_eps_fn, BETAS, variance=v))(x, steps, eps), np.float64)
  ratio = BETA_TILDE[steps - 1] / BETAS[steps - 1]
  expected = 0.5 * 4 * (-np.log(ratio) + ratio - 1.0)  # D = 4 dimensions
  # float32: log(var_p / var_q) + var_q / var_p - 1 cancels to ~0 for equal variances, leaving
  # a few ulp of 1 (~2e-7) per dimension, 4 dimensions: 2e-6 absolute.
  np.testing.assert_allclose(step_loss("large"), expected, rtol=RTOL, atol=2e-6)
  np.testing.assert_allclose(step_loss("small"), 0.0, atol=2e-6)


def test_the_whole_bound_is_prior_plus_decoder_plus_every_kl_with_the_documented_noise():
  """ddpm_bound draws the noise of step i as normal(fold_in(key, i)); with those draws the
  bound is L_T + L_0 + sum_{i>=2} L_{i-1} of the formulas above, term by term."""
  rng = np.random.default_rng(SEED + 2)
  x = _data(rng, 3)
  key = jax.random.PRNGKey(SEED)
  loss, terms = jax.jit(lambda x, k: ddpm.ddpm_bound(_eps_fn, BETAS, x, k, variance="large"))(x, key)
  noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape), np.float64)
           for i in range(T + 1)]
  x0 = _x0(x)
  expected = {"prior": _prior_term(x0), "reconstruction": _decoder_term(x, noise[1]),
              "diffusion": sum(_kl_term(x0, noise[i], i, "large") for i in range(2, T + 1))}
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=RTOL, err_msg=name)
  np.testing.assert_allclose(loss, sum(expected.values()), rtol=RTOL)


def test_exact_ddpm_bound_equals_the_mean_of_one_step_estimates():
  rng = np.random.default_rng(SEED + 3)
  betas = schedules.ddpm_betas("cosine", 8)
  x = np.tile(rng.integers(0, 256, (1, 2, 2, 1)), (2000, 1, 1, 1))
  eps_fn = lambda z, g: 0.7 * z + 0.1 * jnp.tanh(g)[:, None, None, None]
  key_exact, key_one = jax.random.split(jax.random.PRNGKey(SEED))
  exact, _ = jax.jit(lambda x, k: ddpm.ddpm_bound(eps_fn, betas, x, k))(x[:200], key_exact)
  one_step = jax.jit(lambda x, k: ddpm.ddpm_bound_one_step(eps_fn, betas, x, k))(x, key_one)
  exact, one_step = np.asarray(exact, np.float64), np.asarray(one_step, np.float64)
  se = np.sqrt(exact.var() / exact.size + one_step.var() / one_step.size)
  assert abs(exact.mean() - one_step.mean()) < 4 * se


@pytest.mark.parametrize("variance", ["transition", "posterior"])
def test_ddpm_sample_is_algorithm_2_with_its_documented_noise(variance):
  """x_T ~ N(0, I); x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t) + sigma_t z
  with z = 0 at t = 1, sigma_t^2 = beta_t or beta-tilde_t. gamma(0) = -30 makes the bridge's
  alphabar_0 = 1 - 1e-13, DDPM's alphabar_0 = 1 in float32."""
  gamma_fn = schedules.from_betas(BETAS, gamma_0=-30.0)
  key = jax.random.PRNGKey(SEED)
  shape = (3, 2, 2, 1)
  got = jax.jit(lambda k: sampling.ddpm_sample(_eps_fn, gamma_fn, k, shape, num_steps=T,
                                               variance=variance))(key)
  key_init, key_steps = jax.random.split(key)
  x = np.asarray(jax.random.normal(key_init, shape), np.float64)
  sigma2 = BETAS if variance == "transition" else BETA_TILDE
  for n, t in enumerate(range(T, 0, -1)):  # loop index n draws normal(fold_in(key_steps, n))
    z = np.asarray(jax.random.normal(jax.random.fold_in(key_steps, n), shape), np.float64)
    eps_hat = _eps_fn_np(x, GAMMAS[t - 1])
    x = (x - BETAS[t - 1] / np.sqrt(1 - ABAR[t - 1]) * eps_hat) / np.sqrt(1 - BETAS[t - 1])
    x = x + (np.sqrt(sigma2[t - 1]) * z if t > 1 else 0.0)
  # float32: each step rounds at ~1e-7 |x| (|x| < 4) and its gamma_t at 2e-7; the map
  # x_t -> x_{t-1} amplifies earlier errors by 0.4 / sqrt(1 - beta_t) at most, so the error
  # stays within a few steps' rounding: 1e-5 is ~10x that.
  np.testing.assert_allclose(got, x, atol=1e-5)


def test_small_variance_kl_steps_are_the_vdm_discrete_diffusion_terms():
  """With sigma_i^2 = beta-tilde_i, L_{i-1} = 0.5 expm1(gamma_i - gamma_{i-1}) ||eps - eps_hat||^2,
  the VDM discrete-time term of one step (the ddpm module docstring's claim)."""
  rng = np.random.default_rng(SEED + 4)
  steps = rng.integers(2, T + 1, 6)
  x = rng.integers(0, 256, (6, 2, 2, 3))
  eps = rng.standard_normal(x.shape).astype(np.float32)
  eps_fn = lambda z, g: 0.5 * z
  got = jax.jit(functools.partial(ddpm.ddpm_step_loss, eps_fn, BETAS, variance="small"))(
      x, steps, eps)
  gamma_t, gamma_s = GAMMAS[steps - 1], GAMMAS[steps - 2]
  z = (np.sqrt(ABAR[steps - 1])[:, None, None, None] * _x0(x)
       + np.sqrt(1 - ABAR[steps - 1])[:, None, None, None] * eps)
  vdm = 0.5 * np.expm1(gamma_t - gamma_s) * ((eps - eps_fn(z, None)) ** 2).sum((1, 2, 3))
  np.testing.assert_allclose(got, vdm, rtol=RTOL)
