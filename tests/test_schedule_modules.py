"""Learned noise-schedule modules (vdm_jax.nets.schedules): formulas and monotonicity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import nets
from vdm_jax import schedules

SEED = 1607

LEARNED = [nets.LearnedLinear, nets.LearnedNNet, nets.LearnedMonotone]


def _random_gradient_steps(module, params, key, num_steps=200, lr=0.5):
  """num_steps of SGD on random objectives sum_i c_i gamma(t_i) (c_i ~ N(0, 1), t_i ~ U(0, 1))."""
  def step(params, key):
    key_c, key_t = jax.random.split(key)
    t = jax.random.uniform(key_t, (16,))
    c = jax.random.normal(key_c, (16,))
    grads = jax.grad(lambda p: jnp.sum(c * module.apply(p, t)))(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), None
  return jax.lax.scan(step, params, jax.random.split(key, num_steps))[0]


@pytest.mark.parametrize("cls", LEARNED)
def test_learned_schedule_is_increasing_at_init_and_after_random_gradient_steps(cls):
  module = cls()
  key_init, key_steps = jax.random.split(jax.random.PRNGKey(SEED))
  t = jnp.linspace(0.0, 1.0, 2001)
  dgamma = jax.jit(lambda p: jax.jvp(lambda s: module.apply(p, s), (t,), (jnp.ones_like(t),))[1])
  params = module.init(key_init, t)
  assert float(jnp.min(dgamma(params))) >= 0.0
  trained = jax.jit(_random_gradient_steps, static_argnums=0)(module, params, key_steps)
  assert jax.tree.structure(trained) == jax.tree.structure(params)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True))
  assert moved > 1e-3  # the steps did change the parameters
  assert float(jnp.min(dgamma(trained))) >= 0.0


def test_learned_linear_starts_at_the_configured_endpoints_and_is_affine():
  module = nets.LearnedLinear(gamma_min=-10.0, gamma_max=7.0)
  params = {"params": {"w": jnp.array([-3.0]), "b": jnp.array([1.5])}}
  t = jnp.asarray(np.random.default_rng(SEED + 1).random(5), jnp.float32)
  np.testing.assert_allclose(module.apply(params, t), 1.5 + 3.0 * t, rtol=1e-6)
  init = module.init(jax.random.PRNGKey(0), t)
  np.testing.assert_allclose(module.apply(init, jnp.array([0.0, 1.0])), [-10.0, 7.0], rtol=1e-6)


def test_learned_nnet_is_the_reference_monotone_mlp():
  module = nets.LearnedNNet()
  params = module.init(jax.random.PRNGKey(SEED), jnp.zeros(3))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  t = np.random.default_rng(SEED + 2).random(7)
  l1 = t * abs(p["l1"]["kernel"][0, 0]) + p["l1"]["bias"][0]
  pre = (2 * t - 1)[:, None] * np.abs(p["l2"]["kernel"]) + p["l2"]["bias"]
  h = 2 * (1 / (1 + np.exp(-pre)) - 0.5)
  expected = l1 + (h @ np.abs(p["l3"]["kernel"]))[:, 0] / 1024
  np.testing.assert_allclose(module.apply(params, jnp.asarray(t, jnp.float32)), expected,
                             rtol=1e-5)
  assert module.apply(params, jnp.float32(0.5)).shape == ()


def test_learned_monotone_has_separate_endpoints_and_a_normalised_shape():
  module = nets.LearnedMonotone()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros(3))
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                        params)
  b, w = float(params["params"]["b"][0]), float(params["params"]["w"][0])
  gamma_0, gamma_1 = module.apply(params, method="endpoints")
  np.testing.assert_allclose([gamma_0, gamma_1], [b, b + abs(w)], rtol=1e-6)
  np.testing.assert_allclose(module.apply(params, jnp.array([0.0, 1.0]), method="shape"),
                             [0.0, 1.0], atol=1e-6)
  t = jnp.asarray(np.random.default_rng(SEED + 3).random(9), jnp.float32)
  shape = module.apply(params, t, method="shape")
  np.testing.assert_allclose(module.apply(params, t), gamma_0 + (gamma_1 - gamma_0) * shape,
                             rtol=1e-5, atol=1e-5)


def test_fixed_schedule_wraps_a_core_schedule_without_parameters():
  module = nets.FixedSchedule(schedules.cosine(-12.0, 6.0))
  t = jnp.asarray(np.random.default_rng(SEED + 4).random(6), jnp.float32)
  assert module.init(jax.random.PRNGKey(0), t) == {}
  np.testing.assert_allclose(module.apply({}, t), schedules.cosine(-12.0, 6.0)(t), rtol=1e-6)
