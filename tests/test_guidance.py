"""Tests of vdm_jax.guidance: classifier-free guidance, slerp, reconstruction and interpolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.sampling import editing
from vdm_jax.sampling import guidance
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture
from seeding import seed_of

GAMMA_FN = schedules.fixed_linear()


rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))


def _fresh_key():
  return jax.random.PRNGKey(rng.integers(2**31))


def _cond_eps_fn(z, gamma, labels):
  """A nonlinear conditional noise model whose output depends on z, gamma and the label."""
  shift = 0.3 * labels.astype(jnp.float32)[:, None, None, None]
  return jnp.tanh(z + shift) * jax.nn.sigmoid(gamma)[:, None, None, None] + 0.1 * shift


def test_guidance_weight_zero_is_the_conditional_prediction():
  key_z, key_l = jax.random.split(_fresh_key())
  z = jax.random.normal(key_z, (5, 3, 3, 2))
  gamma = jnp.linspace(-5.0, 3.0, 5)
  labels = jax.random.randint(key_l, (5,), 0, 10)
  guided = guidance.classifier_free_guidance(_cond_eps_fn, labels, 10, 0.0)
  np.testing.assert_allclose(guided(z, gamma), _cond_eps_fn(z, gamma, labels), rtol=1e-6, atol=1e-7)


def test_guidance_extrapolates_away_from_the_unconditional_prediction():
  key_z, key_l, key_w = jax.random.split(_fresh_key(), 3)
  z = jax.random.normal(key_z, (4, 2, 2, 1))
  labels = jax.random.randint(key_l, (4,), 0, 10)
  weight = float(jax.random.uniform(key_w, (), minval=0.5, maxval=4.0))
  guided = guidance.classifier_free_guidance(_cond_eps_fn, labels, 10, weight)(z, -2.0)
  gamma = jnp.full((4,), -2.0)
  eps_c, eps_u = _cond_eps_fn(z, gamma, labels), _cond_eps_fn(z, gamma, jnp.full((4,), 10))
  np.testing.assert_allclose(guided, (1 + weight) * eps_c - weight * eps_u, rtol=1e-5, atol=1e-6)


def test_slerp_hits_the_endpoints_and_keeps_the_norm_between_orthogonal_vectors():
  z_a = jnp.asarray([[3.0, 0.0]])
  z_b = jnp.asarray([[0.0, 3.0]])
  out = editing.slerp(z_a, z_b, jnp.asarray([0.0, 0.3, 1.0]))
  np.testing.assert_array_equal(out[0], z_a)
  np.testing.assert_allclose(out[2], z_b, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(out[1]), 3.0, rtol=1e-6)
  np.testing.assert_allclose(out[1, 0], [3 * np.cos(0.3 * np.pi / 2), 3 * np.sin(0.3 * np.pi / 2)], rtol=1e-6)


@pytest.mark.parametrize("stochastic", [False, True])
def test_interpolation_at_lambda_zero_and_one_reproduces_the_reconstructions(stochastic):
  means, stds, weights = np.array([[-0.5] * 4, [0.5] * 4]), np.array([0.2, 0.2]), np.array([0.5, 0.5])
  eps_fn = gaussian_mixture.mixture_eps_fn(means, stds, weights)
  key = _fresh_key() if stochastic else None
  f_a = jnp.full((4,), -0.5) + 0.1 * jax.random.normal(_fresh_key(), (4,))
  f_b = jnp.full((4,), 0.5) + 0.1 * jax.random.normal(_fresh_key(), (4,))

  @jax.jit
  def run(f_a, f_b, key):
    out = editing.interpolate(eps_fn, GAMMA_FN, f_a, f_b, jnp.asarray([0.0, 0.5, 1.0]), t=0.7, num_steps=20,
                               key=key)
    rec_a = editing.reconstruct(eps_fn, GAMMA_FN, f_a[None], t=0.7, num_steps=20,
                                 key=None if key is None else jax.random.fold_in(key, 0))
    rec_b = editing.reconstruct(eps_fn, GAMMA_FN, f_b[None], t=0.7, num_steps=20,
                                 key=None if key is None else jax.random.fold_in(key, 1))
    return out, rec_a[0], rec_b[0]

  out, rec_a, rec_b = run(f_a, f_b, key)
  np.testing.assert_allclose(out[0], rec_a, atol=1e-5)
  np.testing.assert_allclose(out[2], rec_b, atol=1e-5)
  assert np.abs(np.asarray(out[1] - out[0])).max() > 1e-2  # the middle is really different


def test_reconstruction_from_small_t_stays_close_and_from_t_one_forgets_the_image():
  means, stds, weights = np.array([[-0.6] * 3, [0.6] * 3]), np.array([0.1, 0.1]), np.array([0.5, 0.5])
  eps_fn = gaussian_mixture.mixture_eps_fn(means, stds, weights)
  f = jnp.full((64, 3), 0.6) + 0.1 * jax.random.normal(_fresh_key(), (64, 3))

  @jax.jit
  def run(key):
    near = editing.reconstruct(eps_fn, GAMMA_FN, f, t=0.3, num_steps=30, key=key)
    far = editing.reconstruct(eps_fn, GAMMA_FN, f, t=1.0, num_steps=30, key=key)
    return near, far

  near, far = run(_fresh_key())
  # At t = 0.3 (gamma = -7.8, sigma = 0.02) the image survives; at t = 1 about half of the
  # samples land in the other component.
  assert np.abs(np.asarray(near - f)).max() < 0.1
  assert 0.3 < float(np.mean(np.asarray(far)[:, 0] < 0)) < 0.7


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="labels"):
    guidance.classifier_free_guidance(_cond_eps_fn, jnp.zeros((2, 2), jnp.int32), 10, 1.0)
  with pytest.raises(ValueError, match="weight"):
    guidance.classifier_free_guidance(_cond_eps_fn, jnp.zeros((2,), jnp.int32), 10, -1.0)
  with pytest.raises(ValueError, match="t must"):
    editing.reconstruct(_cond_eps_fn, GAMMA_FN, jnp.zeros((1, 2)), t=0.0)
