"""vdm_jax.time_sampling: importance-sampled times keep the VDM bound unbiased and cut its variance.

Closed-form case: data f ~ N(MU, STD^2 I) per dimension with the optimal eps_hat
(gaussian_mixture.gaussian_eps_fn). For one fixed example f, z_t = alpha f + sigma eps and
  eps - eps_hat = (alpha^2 STD^2 / v) eps - sigma alpha (f - MU) / v,   v = alpha^2 STD^2 + sigma^2,
so E_eps ||eps - eps_hat||^2 = D (alpha^2 STD^2 / v)^2 + sigma^2 alpha^2 ||f - MU||^2 / v^2 and the
expected diffusion term is a 1-D integral over gamma, evaluated with scipy quadrature in float64.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from vdm_jax import decoders
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax import time_sampling
from vdm_jax.testing import gaussian_mixture

GAMMA_0, GAMMA_1 = -13.3, 5.0
GAMMA_FN = schedules.fixed_linear(GAMMA_0, GAMMA_1)
MU, STD, SHAPE, VOCAB = 0.1, 0.3, (4, 4, 1), 256
DIM = math.prod(SHAPE)
NUM = 4096  # loss samples per estimator


def _eps_fn(z, gamma):
  flat = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)(z.reshape(z.shape[0], -1), gamma)
  return flat.reshape(z.shape)


def _example(seed):
  """One integer image whose encoding is drawn from N(MU, STD^2) per pixel."""
  f = MU + STD * np.random.default_rng(seed).normal(size=SHAPE)
  return np.clip(np.round((f + 1) / 2 * VOCAB - 0.5), 0, VOCAB - 1).astype(np.int32)


def _expected_diffusion(x):
  """E[diffusion term] for the fixed example x, float64 quadrature over gamma."""
  f = np.asarray(decoders.encode(x, VOCAB), np.float64)
  offset = np.sum(np.square(f - MU))

  def integrand(gamma):
    alpha2, sigma2 = special.expit(-gamma), special.expit(gamma)
    v = alpha2 * STD**2 + sigma2
    return 0.5 * (DIM * (alpha2 * STD**2 / v) ** 2 + sigma2 * alpha2 * offset / v**2)

  return integrate.quad(integrand, GAMMA_0, GAMMA_1, epsabs=1e-10, epsrel=1e-10)[0]


def _losses(loss_fn, x, key):
  loss, terms = jax.jit(loss_fn)(jnp.broadcast_to(x, (NUM,) + SHAPE), key)
  return np.asarray(loss, np.float64), {k: np.asarray(v, np.float64) for k, v in terms.items()}


@functools.partial(jax.jit, static_argnums=1)
def _pilot_proposal(x, num_bins, key):
  """The histogram proposal from a pilot run of the uniform estimator (running estimates)."""
  state = time_sampling.init_second_moments(num_bins)
  u, eps, eps0 = losses.draw_noise(key, (NUM,) + SHAPE)
  _, terms = losses.vdm_loss_from_noise(_eps_fn, GAMMA_FN, jnp.broadcast_to(x, (NUM,) + SHAPE), u,
                                        eps, eps0)
  state = time_sampling.update_second_moments(state, u, terms["diffusion"])
  return time_sampling.proposal_from_second_moments(time_sampling.second_moment_estimates(state))


def _mean_and_stderr(values):
  return values.mean(), values.std(ddof=1) / math.sqrt(values.size)


@pytest.mark.parametrize("antithetic", [False, True])
def test_importance_sampled_bound_is_unbiased_and_has_lower_variance(antithetic):
  x = _example(seed=0)
  proposal = _pilot_proposal(x, num_bins=32, key=jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(2)  # the same (u, eps, eps0) for both estimators
  uniform, u_terms = _losses(
      lambda x, k: losses.vdm_loss(_eps_fn, GAMMA_FN, x, k, antithetic=antithetic), x, key)
  weighted, w_terms = _losses(
      lambda x, k: time_sampling.vdm_loss(_eps_fn, GAMMA_FN, x, k, proposal, antithetic=antithetic),
      x, key)
  # Antithetic samples are dependent; without stratification each estimator's samples are iid.
  expected = _expected_diffusion(x)
  for name, terms in (("uniform", u_terms), ("importance", w_terms)):
    mean, stderr = _mean_and_stderr(terms["diffusion"])
    if not antithetic:
      assert abs(mean - expected) <= 3 * stderr, (name, mean, expected, stderr)
  difference_mean, difference_stderr = _mean_and_stderr(weighted - uniform)
  ratio = uniform.var() / weighted.var()
  print(f"antithetic={antithetic}: E[diffusion] = {expected:.3f} nats; uniform "
        f"{u_terms['diffusion'].mean():.3f} +- {_mean_and_stderr(u_terms['diffusion'])[1]:.3f}, "
        f"importance {w_terms['diffusion'].mean():.3f} +- "
        f"{_mean_and_stderr(w_terms['diffusion'])[1]:.3f}; ELBO difference "
        f"{difference_mean:.3f} +- {difference_stderr:.3f}; "
        f"ELBO variance uniform / importance = {ratio:.2f}")
  if not antithetic:
    assert abs(difference_mean) <= 3 * difference_stderr
  np.testing.assert_array_equal(w_terms["prior"], u_terms["prior"])
  np.testing.assert_array_equal(w_terms["reconstruction"], u_terms["reconstruction"])
  assert ratio > 1.0


def test_stratified_means_agree_over_independent_repeats():
  # Antithetic samples of one call are dependent, so compare means over independent calls.
  x = _example(seed=3)
  proposal = _pilot_proposal(x, num_bins=16, key=jax.random.PRNGKey(4))
  batch = jnp.broadcast_to(x, (64,) + SHAPE)
  uniform = jax.jit(jax.vmap(lambda k: jnp.mean(losses.vdm_loss(_eps_fn, GAMMA_FN, batch, k)[1][
      "diffusion"])))
  weighted = jax.jit(jax.vmap(lambda k: jnp.mean(time_sampling.vdm_loss(
      _eps_fn, GAMMA_FN, batch, k, proposal)[1]["diffusion"])))
  keys = jax.random.split(jax.random.PRNGKey(5), 256)
  expected = _expected_diffusion(x)
  for estimates in (np.asarray(uniform(keys), np.float64), np.asarray(weighted(keys), np.float64)):
    mean, stderr = _mean_and_stderr(estimates)
    assert abs(mean - expected) <= 3 * stderr


def test_quantile_draws_follow_the_bin_probabilities_and_weights_average_to_one():
  probs = np.random.default_rng(6).uniform(0.2, 1.0, size=8)
  proposal = time_sampling.proposal_from_second_moments(np.square(probs), uniform_weight=0.1)
  expected = 0.1 / 8 + 0.9 * probs / probs.sum()
  np.testing.assert_allclose(proposal.probs, expected, rtol=1e-6)
  num = 20000
  t, weights = time_sampling.sample_times(proposal, jax.random.PRNGKey(7), num, antithetic=False)
  bins = np.minimum((np.asarray(t) * 8).astype(int), 7)
  counts = np.bincount(bins, minlength=8)
  # Each count is binomial(num, p_m): within 4 standard deviations.
  np.testing.assert_array_less(np.abs(counts - num * expected), 4 * np.sqrt(num * expected))
  np.testing.assert_allclose(weights, 1.0 / (8 * expected[bins]), rtol=1e-6)
  # E_q[1 / q(t)] = 1 exactly: sum_m p_m / (M p_m).
  midpoints = (np.arange(8) + 0.5) / 8
  weights_at_midpoints = time_sampling.importance_weights(proposal, midpoints)
  np.testing.assert_allclose(np.sum(expected * weights_at_midpoints), 1.0, rtol=1e-6)


def test_uniform_proposal_reproduces_the_uniform_bound():
  x = jnp.asarray(np.random.default_rng(8).integers(0, VOCAB, (8,) + SHAPE))
  key = jax.random.PRNGKey(9)
  ours, ours_terms = jax.jit(lambda x, k: time_sampling.vdm_loss(
      _eps_fn, GAMMA_FN, x, k, time_sampling.uniform_proposal(10)))(x, key)
  theirs, theirs_terms = jax.jit(lambda x, k: losses.vdm_loss(_eps_fn, GAMMA_FN, x, k))(x, key)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  np.testing.assert_allclose(ours_terms["diffusion"], theirs_terms["diffusion"], rtol=1e-5)


def test_running_second_moments_are_per_bin_means_and_decay():
  rng = np.random.default_rng(10)
  t, loss = rng.uniform(size=100).astype(np.float32), rng.normal(size=100).astype(np.float32)
  state = time_sampling.update_second_moments(time_sampling.init_second_moments(5), t, loss)
  bins = np.minimum((t * 5).astype(int), 4)
  expected = [np.mean(np.square(loss[bins == m])) for m in range(5)]
  np.testing.assert_allclose(time_sampling.second_moment_estimates(state), expected, rtol=1e-5)
  state = time_sampling.update_second_moments(state, np.full(4, 0.1, np.float32),
                                              np.full(4, 3.0, np.float32), decay=0.5)
  np.testing.assert_allclose(state.counts[0], 0.5 * np.sum(bins == 0) + 4, rtol=1e-6)
  one = np.array([0.1], np.float32), np.array([2.0], np.float32)
  empty = time_sampling.update_second_moments(time_sampling.init_second_moments(3), *one)
  np.testing.assert_allclose(time_sampling.second_moment_estimates(empty), [4.0, 0.0, 0.0])
  # Bins without samples keep probability w / M > 0.
  assert float(time_sampling.proposal_from_second_moments(
      time_sampling.second_moment_estimates(empty)).probs[1]) == pytest.approx(0.05 / 3)


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="num_bins"):
    time_sampling.uniform_proposal(0)
  with pytest.raises(ValueError, match="uniform_weight"):
    time_sampling.proposal_from_second_moments(np.ones(4), uniform_weight=0.0)
  with pytest.raises(ValueError, match="1-D"):
    time_sampling.proposal_from_second_moments(np.ones((2, 2)))
  with pytest.raises(ValueError, match="decay"):
    time_sampling.update_second_moments(time_sampling.init_second_moments(2), np.zeros(1),
                                        np.zeros(1), decay=1.5)
  with pytest.raises(ValueError, match="both be"):
    time_sampling.update_second_moments(time_sampling.init_second_moments(2), np.zeros(2),
                                        np.zeros(3))
