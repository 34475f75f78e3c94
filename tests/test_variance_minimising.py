"""The variance-minimising schedule gradient of VDM appendix I.2 (vdm_jax.variance_minimising)."""
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import losses
from vdm_jax import variance_minimising

B = 48  # fixed sample set: the expectation E[L^2] is the average over these examples


def _shape_fn(theta):
  """Normalised monotone shape g(t) = sum_k softmax(theta)_k t^k, k = 1..3 (g(0) = 0, g(1) = 1)."""
  weights = jax.nn.softmax(theta)
  return lambda t: sum(weights[k] * t**(k + 1) for k in range(3))


def _eps_fn(phi):
  """A small eps-predictor that depends on z_t and gamma_t: (phi_0 + phi_1 sigmoid(gamma)) z."""
  return lambda z, g: (phi[0] + phi[1] * jax.nn.sigmoid(g))[:, None, None, None] * z


def _plain_loss(phi, ends, theta, f, t, eps):
  gamma_fn = variance_minimising.schedule_from_shape(ends[0], ends[1], _shape_fn(theta))
  gamma_t, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
  z_t = jnp.sqrt(jax.nn.sigmoid(-gamma_t))[:, None, None, None] * f + jnp.sqrt(
      jax.nn.sigmoid(gamma_t))[:, None, None, None] * eps
  return losses.diffusion_loss(eps, _eps_fn(phi)(z_t, gamma_t), dgamma)


def _variance_loss(phi, ends, theta, f, t, eps):
  return variance_minimising.variance_minimising_diffusion_loss(_eps_fn(phi), ends[0], ends[1], _shape_fn(theta), f, t, eps)


def test_shape_gradient_is_finite_difference_of_second_moment_and_other_gradients_are_unchanged():
  rng = np.random.default_rng(1631)
  with jax.enable_x64(True):
    f = jnp.asarray(rng.uniform(-1, 1, (B, 2, 2, 1)))
    eps = jnp.asarray(rng.standard_normal((B, 2, 2, 1)))
    t = jnp.asarray(rng.uniform(0, 1, B))
    phi = jnp.asarray([0.6, 0.3]) + 0.1 * jnp.asarray(rng.standard_normal(2))
    ends = jnp.asarray([-6.0, 4.0]) + 0.5 * jnp.asarray(rng.standard_normal(2))
    theta = jnp.asarray(rng.standard_normal(3))

    grads_var = jax.jit(jax.grad(lambda *a: jnp.mean(_variance_loss(*a)), argnums=(0, 1, 2)))(
        phi, ends, theta, f, t, eps)
    grads_plain = jax.jit(jax.grad(lambda *a: jnp.mean(_plain_loss(*a)), argnums=(0, 1, 2)))(
        phi, ends, theta, f, t, eps)
    second_moment = jax.jit(lambda th: jnp.mean(_plain_loss(phi, ends, th, f, t, eps)**2))
    h = 1e-5
    finite_diff = np.array([(second_moment(theta + h * e) - second_moment(theta - h * e)) / (2 * h)
                            for e in np.eye(3)])

    value_var = jax.jit(_variance_loss)(phi, ends, theta, f, t, eps)
    np.testing.assert_allclose(value_var, _plain_loss(phi, ends, theta, f, t, eps), rtol=1e-12)
    np.testing.assert_allclose(grads_var[2], finite_diff, rtol=1e-6, atol=1e-8 * np.abs(finite_diff).max())
    np.testing.assert_allclose(grads_var[0], grads_plain[0], rtol=1e-12)  # network
    np.testing.assert_allclose(grads_var[1], grads_plain[1], rtol=1e-12)  # endpoints
    # The option changes the shape gradient (it is not d E[L] / d theta).
    assert np.abs(grads_var[2] - grads_plain[2]).max() > 1e-3 * np.abs(grads_var[2]).max()


def test_variance_minimising_vdm_loss_matches_vdm_loss_in_value_and_network_gradient():
  key_x, key = jax.random.split(jax.random.PRNGKey(1630))
  x = jax.random.randint(key_x, (4, 4, 4, 3), 0, 256)
  phi, ends, theta = jnp.asarray([0.7, 0.2]), jnp.asarray([-10.0, 4.0]), jnp.asarray([0.3, -0.2, 0.1])

  def plain(phi, ends):
    gamma_fn = variance_minimising.schedule_from_shape(ends[0], ends[1], _shape_fn(theta))
    return jnp.mean(losses.vdm_loss(_eps_fn(phi), gamma_fn, x, key)[0])

  def variance(phi, ends):
    return jnp.mean(variance_minimising.variance_minimising_vdm_loss(_eps_fn(phi), ends[0], ends[1], _shape_fn(theta), x, key)[0])

  (value_p, grads_p), (value_v, grads_v) = [jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(phi, ends)
                                           for fn in (plain, variance)]
  np.testing.assert_allclose(value_v, value_p, rtol=1e-6)
  for g_v, g_p in zip(grads_v, grads_p, strict=True):  # float32: 1e-5 relative, or 1e-6 of the largest entry
    scale = float(np.max(np.abs(np.asarray(g_p))))
    np.testing.assert_allclose(g_v, g_p, rtol=1e-5, atol=1e-6 * scale)
