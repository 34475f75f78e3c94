"""Tests of vdm_jax.decoders: encoders, the VDM categorical and the DDPM discretised-Gaussian decoders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vdm_jax import decoders
from vdm_jax import losses
from seeding import seed_of

rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))


def test_encoders_map_values_to_bin_centres_and_to_the_ddpm_range():
  x = np.arange(256)
  f = decoders.encode(x)
  np.testing.assert_allclose(f, (2 * x + 1) / 256 - 1, rtol=0, atol=1e-7)
  np.testing.assert_allclose(decoders.encode(np.array([0, 1]), vocab_size=2), [-0.5, 0.5])
  np.testing.assert_allclose(decoders.ddpm_encode(x), x / 127.5 - 1, atol=1e-7)
  with pytest.raises(ValueError, match="vocab_size"):
    decoders.encode(x, vocab_size=1)


@pytest.mark.parametrize("vocab_size", [2, 256])
def test_uniform_categorical_decoder_costs_exactly_log_vocab_size_nats_per_dim(vocab_size):
  # alpha_0 = exp(-25) is below float32 resolution next to z_0 ~ 1: every logit is the same.
  x = rng.integers(0, vocab_size, (2, 3, 3, 2))
  z_0 = rng.standard_normal(x.shape).astype(np.float32)
  loss = jax.jit(losses.reconstruction_loss, static_argnums=3)(x, z_0, 50.0, vocab_size)
  np.testing.assert_allclose(loss, 18 * np.log(vocab_size), rtol=1e-6)
  np.testing.assert_allclose(losses.bits_per_dim(loss, 18), np.log2(vocab_size), rtol=1e-6)


def test_categorical_logprobs_equal_the_reference_rescaled_form_in_float64():
  gamma_0 = rng.uniform(-8, -2, 2).astype(np.float32)
  z_0 = rng.uniform(-1.1, 1.1, (2, 2, 2, 3)).astype(np.float32)
  logprobs = jax.jit(decoders.categorical_logprobs)(z_0, gamma_0)
  g = gamma_0.astype(np.float64)[:, None, None, None, None]
  u = z_0[..., None] / np.sqrt(1 / (1 + np.exp(g)))  # z_0 / alpha_0
  logits = -0.5 * ((u - ((2 * np.arange(256) + 1) / 256 - 1)) * np.exp(-g / 2))**2
  expected = logits - special.logsumexp(logits, axis=-1, keepdims=True)
  np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(special.logsumexp(np.asarray(logprobs, np.float64), axis=-1), 0.0, atol=1e-5)


def test_decode_argmax_recovers_the_data_and_sampling_follows_the_decoder():
  x = rng.integers(0, 256, (2, 4, 4, 3))
  gamma_0 = -13.3
  z_0 = np.sqrt(1 / (1 + np.exp(gamma_0))) * decoders.encode(x)
  np.testing.assert_array_equal(jax.jit(decoders.decode)(z_0, gamma_0), x)
  # gamma_0 = -8: a latent between bins 100 and 101 spreads mass over a few values.
  z = jnp.full((4000, 1, 1, 1), 0.5 * (decoders.encode(100) + decoders.encode(101)) * np.sqrt(1 / (1 + np.exp(-8))))
  sample = jax.jit(lambda z, key: decoders.decode(z, -8.0, key=key))
  samples = np.asarray(sample(z, jax.random.PRNGKey(rng.integers(2**31)))).ravel()
  probs = np.exp(np.asarray(decoders.categorical_logprobs(z[:1], -8.0), np.float64)).ravel()
  mean, var = probs @ np.arange(256), probs @ np.arange(256)**2 - (probs @ np.arange(256))**2
  assert abs(samples.mean() - mean) < 4 * np.sqrt(var / samples.size)
  assert var > 0.1


def test_discretized_gaussian_probabilities_over_256_bins_sum_to_one():
  mean = rng.uniform(-1.5, 1.5, 64).astype(np.float32)
  log_scale = rng.uniform(-9, 1, 64).astype(np.float32)
  logprobs = jax.jit(decoders.discretized_gaussian_logprobs)(mean, log_scale)
  assert logprobs.shape == (64, 256) and np.all(np.isfinite(logprobs))
  np.testing.assert_allclose(special.logsumexp(np.asarray(logprobs, np.float64), axis=-1), 0.0, atol=2e-6)


def test_discretized_gaussian_matches_cdf_differences_in_float64_and_is_finite_in_the_tails():
  mean = rng.uniform(-1, 1, 8)
  log_scale = rng.uniform(-6, -2, 8)
  logprobs = np.asarray(jax.jit(decoders.discretized_gaussian_logprobs)(mean.astype(np.float32),
                                                                      log_scale.astype(np.float32)))
  edges = np.concatenate([[-np.inf], (2 * np.arange(255) + 1) / 255 - 1, [np.inf]])
  standardized = (edges[None, :] - mean[:, None]) / np.exp(log_scale)[:, None]
  log_cdf = special.log_ndtr(standardized)
  log_cdf_upper = special.log_ndtr(-standardized)  # log(1 - Phi)
  with np.errstate(divide="ignore", invalid="ignore"):  # the unselected branch hits log(0)
    expected = np.where(edges[None, 1:] < mean[:, None],
                        log_cdf[:, 1:] + np.log(-np.expm1(log_cdf[:, :-1] - log_cdf[:, 1:])),
                        log_cdf_upper[:, :-1] + np.log(-np.expm1(log_cdf_upper[:, 1:] - log_cdf_upper[:, :-1])))
  likely = expected > -20
  np.testing.assert_allclose(logprobs[likely], expected[likely], rtol=1e-4, atol=1e-5)
  far = expected > -1e4
  np.testing.assert_allclose(logprobs[far], expected[far], rtol=1e-4)
  gradient = jax.jit(jax.grad(lambda m: jnp.sum(decoders.discretized_gaussian_log_likelihood(
      np.array([[0, 255, 128]]), m, np.float32(-8.0)))))(jnp.asarray([[0.9, -0.9, 0.0]]))
  assert np.all(np.isfinite(gradient))


def test_discretized_gaussian_log_likelihood_picks_the_bin_of_each_value():
  x = rng.integers(0, 256, (2, 3, 3, 1))
  mean = rng.uniform(-1, 1, x.shape).astype(np.float32)
  log_scale = np.float32(-3.0)
  logprobs = jax.jit(decoders.discretized_gaussian_logprobs)(mean, log_scale)
  expected = np.take_along_axis(np.asarray(logprobs), x[..., None], -1).reshape(2, -1).sum(-1)
  np.testing.assert_allclose(jax.jit(decoders.discretized_gaussian_log_likelihood)(x, mean, log_scale), expected,
                             rtol=1e-6)


@pytest.mark.parametrize("log_odds", [None, -1.5])
def test_grid_noise_estimate_matches_the_two_level_closed_form(log_odds):
  # V = 2, levels -1/2 and 1/2, prior log odds b (0 when uniform): P(v = 1 | z) =
  # sigmoid(alpha z / sigma^2 + b), so E[enc(v) | z] = tanh(alpha z / (2 sigma^2) + b / 2) / 2
  # and eps = (z - alpha E) / sigma.
  gamma = rng.uniform(-6.0, 4.0, 5).astype(np.float32)
  z = rng.standard_normal((5, 3, 3, 1)).astype(np.float32)
  g = gamma.astype(np.float64)[:, None, None, None]
  alpha, sigma = np.sqrt(special.expit(-g)), np.sqrt(special.expit(g))
  b = 0.0 if log_odds is None else log_odds
  expected = (z - alpha * np.tanh(alpha * z / (2 * sigma ** 2) + b / 2) / 2) / sigma
  prior = None if log_odds is None else jnp.asarray([0.3, 0.3 + log_odds])  # any shift of both
  got = decoders.grid_noise_estimate(jnp.asarray(z), jnp.asarray(gamma), 2, prior)
  # float32: relative rounding of a few 1e-7 in each factor, amplified by 1 / sigma <= 21 at
  # gamma = -6 and by the tanh's slope alpha^2 / (2 sigma^2) <= 200: well inside 1e-3.
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("gamma", [-6.0, -2.0, 1.0])
@pytest.mark.parametrize("prior", [None, (0.5, 0.05, 0.05, 0.1, 0.3)])
def test_grid_noise_estimate_is_the_least_squares_noise_estimate_under_its_prior(gamma, prior):
  # Data independent on the 5-level grid with this prior (None: uniform): E[eps | z] has
  # the smallest mean squared error of all functions of z; perturbing it in any direction,
  # or using the other prior, must cost more.
  vocab_size, n = 5, 200_000
  x = rng.choice(vocab_size, (n, 1, 1, 1), p=prior)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  alpha, sigma = np.sqrt(special.expit(-gamma)), np.sqrt(special.expit(gamma))
  z = jnp.asarray(alpha * decoders.encode(x, vocab_size) + sigma * eps, jnp.float32)
  skewed = jnp.log(jnp.asarray((0.5, 0.05, 0.05, 0.1, 0.3)))
  est, other_prior = (np.asarray(decoders.grid_noise_estimate(z, gamma, vocab_size, logits))
                      for logits in ((None, skewed) if prior is None else (skewed, None)))
  best = np.mean((eps - est) ** 2)
  # Standard error of a difference of two such means over 2e5 draws: < 1e-3 of best.
  for other in (1.05 * est, 0.95 * est, est + 0.05, z / sigma, other_prior):
    assert np.mean((eps - other) ** 2) > best + 1e-4
