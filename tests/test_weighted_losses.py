"""The weighted-loss family of vdm_jax.weighted_losses against Kingma & Gao (2023), table 1.

The weightings are written out below from the paper (lambda = log SNR = -gamma), so a wrong
constant or sign in the library's weight functions cannot also be in the expected values.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax import weighted_losses

SEED = 1606
S = 0.8  # std of the Gaussian "data" x ~ N(0, S^2 I)


def _sech(x):
  return 1.0 / np.cosh(x)


def _normal_pdf(x, mean, std):
  return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))


# Kingma & Gao (2023), table 1 and sec. 5, in float64. Options are passed as keywords.
PAPER = {
    # ELBO (Kingma et al. 2021): w = 1.
    "elbo": lambda lam: np.ones_like(lam),
    # IDDPM's eps-MSE under the cosine schedule: w = p(lambda) = sech(lambda / 2) / (2 pi).
    "eps_mse": lambda lam: _sech(lam / 2) / (2 * np.pi),
    # Sigmoid weighting (sec. 5): w = sigmoid(-lambda + b), decreasing in lambda.
    "sigmoid": lambda lam, shift=0.0: 1.0 / (1.0 + np.exp(lam - shift)),
    # EDM (Karras et al. 2022): w = N(lambda; 2.4, 2.4^2) (e^-lambda + sigma_data^2) / sigma_data^2
    # with 2.4 = -2 P_mean = 2 P_std for P_mean = -1.2, P_std = 1.2 and sigma_data = 0.5.
    "edm": lambda lam, p_mean=-1.2, p_std=1.2, sigma_data=0.5: (
        _normal_pdf(lam, -2 * p_mean, 2 * p_std) * (np.exp(-lam) + sigma_data**2) / sigma_data**2),
    # Min-SNR-gamma (Hang et al. 2023) on the eps-MSE: per-t weight min(SNR, g) / SNR.
    "min_snr": lambda lam, snr_gamma=5.0: (
        _sech(lam / 2) / (2 * np.pi) * np.minimum(1.0, snr_gamma * np.exp(-lam))),
}
OPTIONS = [("elbo", {}), ("eps_mse", {}), ("sigmoid", {}), ("sigmoid", {"shift": 2.0}),
           ("edm", {}), ("edm", {"sigma_data": 1.3, "p_mean": 0.4}), ("min_snr", {}),
           ("min_snr", {"snr_gamma": 1.5})]


def test_the_library_offers_exactly_the_paper_weightings():
  assert set(weighted_losses.WEIGHTINGS) == set(PAPER)


@pytest.mark.parametrize("name, options", OPTIONS, ids=[f"{n}{o}" for n, o in OPTIONS])
def test_weighted_diffusion_loss_is_half_w_of_lambda_times_gamma_prime_times_the_error(
    name, options):
  """L_w = 0.5 w(lambda) (-d lambda / dt) ||eps - eps_hat||^2 with lambda = -gamma."""
  rng = np.random.default_rng(SEED)
  gamma = np.linspace(-12.0, 12.0, 25)  # includes sigmoid's and min-SNR's switch points
  eps, eps_hat = (rng.standard_normal((25, 2, 2, 3)) for _ in range(2))
  dgamma = rng.uniform(0.5, 20.0, 25)
  weight_fn = functools.partial(weighted_losses.WEIGHTINGS[name], **options)
  got = weighted_losses.weighted_diffusion_loss(
      *(jnp.asarray(a, jnp.float32) for a in (eps, eps_hat, gamma, dgamma)), weight_fn)
  expected = (0.5 * PAPER[name](-gamma, **options) * dgamma
              * ((eps.astype(np.float32) - eps_hat.astype(np.float32)) ** 2).sum((1, 2, 3)))
  # float32: exp/sech at |lambda| <= 12 and a 12-term sum of squares, each a few ulp
  # (6e-8) relative; 1e-5 is ~20x that.
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def _optimal_eps(z_t, gamma_t):
  """E[eps | z_t] for x ~ N(0, S^2 I): sigma_t z_t / (alpha_t^2 S^2 + sigma_t^2)."""
  g = gaussian.broadcast_to_data(gamma_t, z_t.ndim)
  var = jax.nn.sigmoid(g)
  return jnp.sqrt(var) * z_t / (jax.nn.sigmoid(-g) * S**2 + var)


def _within_4_se(samples, expected):
  samples = np.asarray(samples, np.float64)
  se = samples.std() / np.sqrt(samples.size)
  assert abs(samples.mean() - expected) < 4 * se, (samples.mean(), expected, se)


def test_elbo_weighting_is_the_diffusion_loss_and_eps_mse_weighting_is_l_simple_under_cosine():
  rng = np.random.default_rng(SEED + 1)
  f, eps = rng.uniform(-1, 1, (5, 2, 2, 3)), rng.standard_normal((5, 2, 2, 3))
  t = jnp.asarray(rng.uniform(0, 1, 5), jnp.float32)
  eps_fn = lambda z, g: 0.8 * z
  gamma_fn = schedules.cosine(-13.3, 5.0)
  gamma_t, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
  eps_hat = eps_fn(gaussian.sample_forward(f, gamma_t, eps), gamma_t)
  elbo = weighted_losses.weighted_diffusion_loss_from_noise(eps_fn, gamma_fn, f, t, eps)
  np.testing.assert_allclose(elbo, losses.diffusion_loss(eps, eps_hat, dgamma), rtol=1e-5)
  mse = weighted_losses.weighted_diffusion_loss_from_noise(
      eps_fn, gamma_fn, f, t, eps, weight_fn=weighted_losses.eps_mse_weight)
  # The truncated cosine maps t to u in [u_min, u_max], gamma = 2 log tan(pi u / 2):
  # 0.5 w gamma' = 0.5 (u_max - u_min), L_simple's constant weighting.
  u_min, u_max = [2 / np.pi * np.arctan(np.exp(g / 2)) for g in (-13.3, 5.0)]
  np.testing.assert_allclose(mse, 0.5 * (u_max - u_min) * ((eps - eps_hat) ** 2).sum((1, 2, 3)),
                             rtol=1e-4)


@pytest.mark.parametrize("name, options", [("sigmoid", {"shift": 1.0}), ("edm", {}),
                                           ("min_snr", {})])
def test_weighted_loss_is_the_lambda_integral_for_two_schedules_with_the_same_endpoints(
    name, options):
  """E_t[L_w] = int 0.5 w(-g) S^2 / (S^2 + e^g) dg over [gamma_0, gamma_1] for Gaussian data
  with the optimal eps_hat (Kingma & Gao, eq. 9: invariant to the schedule between the ends)."""
  gamma_0, gamma_1, num = -10.0, 6.0, 20_000
  grid = np.linspace(gamma_0, gamma_1, 200_001)
  integrand = 0.5 * PAPER[name](-grid, **options) * S**2 / (S**2 + np.exp(grid))
  expected = np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(grid))
  weight_fn = functools.partial(weighted_losses.WEIGHTINGS[name], **options)
  for n, factory in enumerate((schedules.fixed_linear, schedules.cosine)):
    gamma_fn = factory(gamma_0, gamma_1)
    key_x, key_t, key_eps = jax.random.split(jax.random.PRNGKey(SEED + 10 * n), 3)
    f = S * jax.random.normal(key_x, (num, 1))
    loss = jax.jit(lambda f, t, e: weighted_losses.weighted_diffusion_loss_from_noise(
        _optimal_eps, gamma_fn, f, t, e, weight_fn=weight_fn))(  # noqa: B023
            f, jax.random.uniform(key_t, (num,)), jax.random.normal(key_eps, f.shape))
    _within_4_se(loss, expected)


def test_weightings_have_the_papers_shape():
  """sigmoid falls from 1 to 0 in lambda and is 1/2 at lambda = shift; EDM's weight without
  its (e^-lambda + sd^2) / sd^2 factor is the N(2.4, 2.4^2) density (mass 1, mode 2.4)."""
  lam = np.linspace(-30.0, 30.0, 601)
  sigmoid = np.asarray(weighted_losses.sigmoid_weight(lam, shift=2.0), np.float64)
  assert np.all(np.diff(sigmoid) <= 0) and sigmoid[0] > 0.999 and sigmoid[-1] < 1e-6
  np.testing.assert_allclose(weighted_losses.sigmoid_weight(2.0, shift=2.0), 0.5)
  edm = np.asarray(weighted_losses.edm_weight(lam), np.float64) * 0.25 / (np.exp(-lam) + 0.25)
  np.testing.assert_allclose(np.sum(edm) * (lam[1] - lam[0]), 1.0, rtol=1e-4)
  assert math.isclose(lam[np.argmax(edm)], 2.4, abs_tol=0.1)
