"""Tests of vdm_jax.losses, weighted_losses and ddpm: the bounds, their terms and estimators."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import ddpm
from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax import weighted_losses
from seeding import seed_of

rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))
S = 0.8  # std of the Gaussian "data" x ~ N(0, S^2 I)


def _key():
  return jax.random.PRNGKey(rng.integers(2**31))


def _optimal_eps(z_t, gamma_t):
  """E[eps | z_t] for x ~ N(0, S^2 I): sigma_t z_t / (alpha_t^2 S^2 + sigma_t^2)."""
  g = gaussian.broadcast_to_data(gamma_t, z_t.ndim)
  var = jax.nn.sigmoid(g)
  return jnp.sqrt(var) * z_t / (jax.nn.sigmoid(-g) * S**2 + var)


def _gaussian_elbo_diffusion(gamma_0, gamma_1, num_dims):
  """D/2 [log(1 + S^2 e^{-gamma_0}) - log(1 + S^2 e^{-gamma_1})]."""
  return 0.5 * num_dims * (np.log1p(S**2 * np.exp(-gamma_0)) - np.log1p(S**2 * np.exp(-gamma_1)))


def _within_4_se(samples, expected):
  samples = np.asarray(samples, np.float64)
  se = samples.std() / np.sqrt(samples.size)
  assert abs(samples.mean() - expected) < 4 * se, (samples.mean(), expected, se)


def test_vdm_loss_draws_eps0_then_t_then_eps_and_sums_its_terms():
  x = jax.random.randint(_key(), (3, 4, 4, 3), 0, 256)
  key = _key()
  gamma_fn = schedules.fixed_linear()
  eps_fn = lambda z, g: 0.9 * z
  for num_steps, antithetic in ((10, False),):  # one mode: each jit of the full bound costs seconds
    loss, terms = jax.jit(lambda x, k: losses.vdm_loss(
        eps_fn, gamma_fn, x, k, num_steps=num_steps, antithetic=antithetic))(x, key)  # noqa: B023 (called in this iteration)
    key_eps0, key_t, key_eps = jax.random.split(key, 3)
    t = losses.sample_times(key_t, 3, antithetic=antithetic)
    expected, expected_terms = jax.jit(functools.partial(
        losses.vdm_loss_from_noise, eps_fn, gamma_fn, num_steps=num_steps))(
        x, t, jax.random.normal(key_eps, x.shape), jax.random.normal(key_eps0, x.shape))
    assert loss.shape == (3,) and set(terms) == {"prior", "reconstruction", "diffusion"}
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Each term from its own draw. The decoder's log p moves by up to ~2e-5 nats per pixel
    # when z_0 / alpha_0 moves by an ulp (1.2e-7, 1e-4 of its width sigma_0 / alpha_0 =
    # 1.3e-3): 48 pixels, 1e-3 nats; another eps0 would change it by ~0.1.
    for name, value in expected_terms.items():
      np.testing.assert_allclose(terms[name], value, rtol=1e-5, atol=1e-3, err_msg=name)


def test_antithetic_times_are_stratified_and_discrete_times_round_up():
  t = losses.sample_times(_key(), 8, antithetic=True)
  np.testing.assert_allclose(np.sort(np.asarray(t)) - np.sort(np.asarray(t))[0], np.arange(8) / 8, atol=1e-6)
  t_up, s = losses.round_up_to_grid(jnp.asarray([0.01, 0.1, 0.55, 1.0]), 10)
  np.testing.assert_allclose(t_up, [0.1, 0.1, 0.6, 1.0], rtol=1e-6)
  np.testing.assert_allclose(s, [0.0, 0.0, 0.5, 0.9], atol=1e-6)


def test_every_loss_term_and_its_gradient_is_finite_for_gamma_in_pm30():
  gamma = jnp.linspace(-30.0, 30.0, 61)
  shape = (61, 2, 2, 3)
  x = jax.random.randint(_key(), shape, 0, 256)
  f = (2 * x + 1) / 256 - 1
  eps, eps0 = jax.random.normal(_key(), shape), jax.random.normal(_key(), shape)

  def all_terms(gamma, scale):
    eps_hat = scale * gaussian.sample_forward(f, gamma, eps)
    terms = [
        losses.prior_loss(f, gamma),
        losses.reconstruction_loss(x, gaussian.sample_forward(f, gamma, eps0), gamma),
        losses.diffusion_loss(eps, eps_hat, jnp.exp(0.1 * gamma)),
        losses.discrete_diffusion_loss(eps, eps_hat, gamma, gamma - 0.5, 10),
    ]
    terms += [weighted_losses.weighted_diffusion_loss(eps, eps_hat, gamma, 1.0, w)
              for w in weighted_losses.WEIGHTINGS.values()]
    return jnp.stack(terms)

  values = jax.jit(all_terms)(gamma, 0.9)
  grads = jax.jit(jax.grad(lambda g, a: jnp.sum(all_terms(g, a)), argnums=(0, 1)))(gamma, 0.9)
  assert np.all(np.isfinite(values)) and np.all(np.asarray(values) >= 0)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_prior_loss_is_accurate_in_float32_and_vanishes_when_alpha_1_vanishes():
  gamma_1 = np.array([-5.0, 0.0, 5.0, 10.0, 20.0], np.float32)
  f = rng.uniform(-1, 1, (5, 2, 2, 3)).astype(np.float32)
  g = gamma_1.astype(np.float64)
  alpha2 = 1 / (1 + np.exp(g))
  d = np.where(alpha2 < 0.1, sum(alpha2**k / k for k in range(2, 40)), np.logaddexp(0, -g) - alpha2)
  expected = 0.5 * (alpha2 * np.sum(f.astype(np.float64)**2, axis=(1, 2, 3)) + 12 * d)
  np.testing.assert_allclose(jax.jit(losses.prior_loss)(f, gamma_1), expected, rtol=2e-6)
  assert np.all(np.asarray(losses.prior_loss(f, 40.0)) < 1e-15)


@pytest.mark.parametrize("factory", [schedules.fixed_linear, schedules.cosine])
def test_gaussian_data_with_optimal_denoiser_has_the_closed_form_continuous_diffusion_loss(factory):
  gamma_0, gamma_1, num, dims = -13.3, 5.0, 20_000, (2, 2, 1)
  gamma_fn = factory(gamma_0, gamma_1)

  @jax.jit
  def estimate(key):
    key_x, key_t, key_eps = jax.random.split(key, 3)
    f = S * jax.random.normal(key_x, (num,) + dims)
    t = jax.random.uniform(key_t, (num,))
    eps = jax.random.normal(key_eps, f.shape)
    gamma_t, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    eps_hat = _optimal_eps(gaussian.sample_forward(f, gamma_t, eps), gamma_t)
    return losses.diffusion_loss(eps, eps_hat, dgamma)

  _within_4_se(estimate(_key()), _gaussian_elbo_diffusion(gamma_0, gamma_1, 4))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _expected_discrete_loss(gamma_fn, num_steps):
  """E_{x, eps, i}[discrete loss] for 1-D Gaussian data, exactly: the integrand is quadratic in
  (x, eps), so 3x3 Gauss-Hermite nodes give the expectation over x and eps without error."""
  nodes, weights = np.polynomial.hermite_e.hermegauss(3)
  x, e = np.meshgrid(S * nodes, nodes, indexing="ij")
  w = np.tile(np.outer(weights, weights).ravel() / weights.sum()**2, num_steps)
  t = np.repeat(np.arange(1, num_steps + 1), 9) / num_steps
  f = np.tile(x.ravel(), num_steps)[:, None].astype(np.float32)
  eps = np.tile(e.ravel(), num_steps)[:, None].astype(np.float32)
  gamma_t, gamma_s = gamma_fn(jnp.asarray(t, jnp.float32)), gamma_fn(jnp.asarray(t - 1 / num_steps, jnp.float32))
  eps_hat = _optimal_eps(gaussian.sample_forward(f, gamma_t, eps), gamma_t)
  loss = losses.discrete_diffusion_loss(eps, eps_hat, gamma_t, gamma_s, num_steps)
  return jnp.sum(loss * w) / num_steps  # mean over the T steps


def test_discrete_time_loss_approaches_the_continuous_one_like_one_over_t():
  gamma_fn = schedules.fixed_linear(-13.3, 5.0)
  continuous = _gaussian_elbo_diffusion(-13.3, 5.0, 1)
  errors = np.array([float(_expected_discrete_loss(gamma_fn, T)) - continuous for T in (50, 100, 200, 400)])
  assert np.all(errors > 0)
  ratios = errors[1:] / errors[:-1]
  assert np.all((ratios > 0.4) & (ratios < 0.6)), ratios
  assert errors[-1] < 0.03 * continuous


def test_x0_and_v_prediction_conversions_invert_and_rescale_the_eps_error():
  shape, gamma = (4, 2, 2, 3), rng.uniform(-8, 8, 4).astype(np.float32)
  x0, eps, eps_hat = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  z = gaussian.sample_forward(x0, gamma, eps)
  x0_hat = weighted_losses.eps_to_x0(z, eps_hat, gamma)
  np.testing.assert_allclose(weighted_losses.x0_to_eps(z, x0_hat, gamma), eps_hat, rtol=1e-3, atol=1e-3)
  v, v_hat = weighted_losses.velocity(x0, eps, gamma), weighted_losses.velocity(x0_hat, eps_hat, gamma)
  np.testing.assert_allclose(weighted_losses.v_to_eps(z, v, gamma), eps, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(weighted_losses.v_to_x0(z, v, gamma), x0, rtol=1e-4, atol=1e-4)
  mse = weighted_losses.simple_loss(eps, eps_hat)
  g = gamma.astype(np.float64)
  np.testing.assert_allclose(weighted_losses.simple_loss(x0, x0_hat), np.exp(g) * mse, rtol=1e-3)
  np.testing.assert_allclose(weighted_losses.simple_loss(v, v_hat), (1 + np.exp(g)) * mse, rtol=1e-3)
  as_v = weighted_losses.as_eps_fn(lambda z, g: weighted_losses.velocity(x0_hat, eps_hat, g), "v")
  np.testing.assert_allclose(as_v(z, gamma), eps_hat, rtol=1e-3, atol=1e-3)


def test_simple_loss_kinds_match_numpy():
  a, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
  r = a - b
  np.testing.assert_allclose(weighted_losses.simple_loss(a, b), (r**2).sum((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(weighted_losses.simple_loss(a, b, kind="l1"), np.abs(r).sum((1, 2)), rtol=1e-5)
  huber = np.where(np.abs(r) <= 0.5, 0.5 * r**2, 0.5 * (np.abs(r) - 0.25)).sum((1, 2))
  np.testing.assert_allclose(weighted_losses.simple_loss(a, b, kind="huber", huber_delta=0.5), huber, rtol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    weighted_losses.simple_loss(a, b, kind="l3")


def test_bad_arguments_raise_value_errors():
  x = np.zeros((2, 2, 2, 1), np.int32)
  with pytest.raises(ValueError, match="num_steps"):
    losses.vdm_loss(lambda z, g: z, schedules.fixed_linear(), x, _key(), num_steps=-1)
  with pytest.raises(ValueError, match="eps and eps_hat"):
    losses.diffusion_loss(np.zeros((2, 3)), np.zeros((2, 4)), 1.0)
  with pytest.raises(ValueError, match="t"):
    losses.vdm_loss_from_noise(lambda z, g: z, schedules.fixed_linear(), x, np.zeros(3), x * 1.0, x * 1.0)
  with pytest.raises(ValueError, match="num_dims"):
    losses.bits_per_dim(1.0, 0)
  with pytest.raises(ValueError, match="variance"):
    ddpm.ddpm_bound(lambda z, g: z, np.full(3, 0.1), x, _key(), variance="medium")
  with pytest.raises(ValueError, match="parameterization"):
    weighted_losses.as_eps_fn(lambda z, g: z, "score")
