"""nets.Ensemble and ModelConfig.ensemble_size: the mean at evaluation, split batches in training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seeding import seed_of
from vdm_jax import model
from vdm_jax import nets
from vdm_jax.train import step

SIZE = 2
# eps_hat is O(1) here; the two sides run the same float32 operations in a different
# association (one sum over members against another), a few ulps of the O(1) terms.
ATOL = 1e-5


def _member():
  return nets.UNet(n_embd=8, n_layer=0, channel_mult=(1,), attention_resolutions=(), dropout=0.0)


def _perturbed(params, seed):
  """params + N(0, 0.1^2) noise: conv_out starts at zero, which would make every output 0.

  The noise is drawn on the host: one jax.random draw per leaf compiled for about 8 s here.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype),
                      params)


def _inputs(seed, batch):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.standard_normal((batch, 8, 8, 1)), jnp.float32)
  g = jnp.asarray(rng.uniform(-8.0, 4.0, batch), jnp.float32)
  return z, g


def _setup(request, batch=2 * SIZE):
  ensemble = nets.Ensemble(_member(), SIZE)
  z, g = _inputs(seed_of(request), batch)
  params = jax.jit(ensemble.init)(jax.random.PRNGKey(seed_of(request)), z, g)["params"]
  return ensemble, _perturbed(params, seed_of(request) + 1), z, g


@jax.jit
def _apply_member(member_params, z, g):
  return _member().apply({"params": member_params}, z, g)


def _alone(params, i, z, g):
  """Member i applied as a network of its own."""
  return _apply_member(params[f"member_{i}"], z, g)


def _apply(ensemble, params, z, g, train):
  return jax.jit(ensemble.apply, static_argnames="train")({"params": params}, z, g, train=train)


def test_evaluation_predicts_the_mean_of_the_members(request):
  ensemble, params, z, g = _setup(request)
  alone = np.stack([_alone(params, i, z, g) for i in range(SIZE)])
  assert alone.std(axis=0).mean() > 0.05  # the members differ, so a wrong mean shows
  np.testing.assert_allclose(_apply(ensemble, params, z, g, False),
                             alone.mean(axis=0), atol=ATOL)


def test_training_gives_member_i_the_examples_i_plus_multiples_of_the_size(request):
  ensemble, params, z, g = _setup(request)
  out = np.asarray(_apply(ensemble, params, z, g, True))
  for b in range(z.shape[0]):
    np.testing.assert_allclose(out[b], _alone(params, b % SIZE, z[b:b + 1], g[b:b + 1])[0],
                               atol=ATOL, err_msg=f"example {b}")


def test_a_member_gets_no_gradient_from_the_other_members_examples(request):
  ensemble, params, z, g = _setup(request)
  def loss(p):  # only the examples of member 1
    return jnp.sum(ensemble.apply({"params": p}, z, g, train=True)[1::SIZE] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  norms = {name: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))
           for name, tree in grads.items()}
  assert norms.pop("member_1") > 0
  assert set(norms.values()) == {0.0}, norms


def test_a_training_batch_must_be_a_multiple_of_the_size(request):
  ensemble, params, _, _ = _setup(request)
  z, g = _inputs(seed_of(request), 2 * SIZE + 1)
  with pytest.raises(ValueError, match="multiple of 2.*training.batch_size"):
    ensemble.apply({"params": params}, z, g, train=True)


def test_model_config_rejects_an_ensemble_size_below_one():
  with pytest.raises(ValueError, match="ensemble_size"):
    model.ModelConfig(ensemble_size=0)


def _digits_config(**kw):
  return model.ModelConfig(vocab_size=17, image_shape=(8, 8, 1), network="unet", n_embd=8,
                           n_layer=0, channel_mult=(1,), attention_resolutions=(), dropout=0.0,
                           grid_skip=True, grid_prior=True, **kw)


def test_the_training_bound_is_each_members_own_bound_on_its_examples(request):
  ensemble = model.VDM(_digits_config(ensemble_size=2))
  single = model.VDM(_digits_config())
  rng = np.random.default_rng(seed_of(request))
  x = jnp.asarray(rng.integers(0, 17, (6, 8, 8, 1)), jnp.int32)
  params = _perturbed(jax.jit(ensemble.init)(jax.random.PRNGKey(seed_of(request)), x),
                      seed_of(request) + 1)
  t = jnp.asarray(rng.uniform(0, 1, 6), jnp.float32)
  eps, eps0 = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for _ in range(2))
  train_loss = jax.jit(lambda *a: ensemble.loss_from_noise(*a, train=True, key=jax.random.PRNGKey(0)))
  loss, _ = train_loss(params, x, t, eps, eps0)
  for i in range(2):
    own = dict(params, score_model=params["score_model"][f"member_{i}"])
    alone, _ = jax.jit(single.loss_from_noise)(own, x[i::2], t[i::2], eps[i::2], eps0[i::2])
    np.testing.assert_allclose(loss[i::2], alone, rtol=1e-5, err_msg=f"member {i}")


def test_weight_decay_reaches_each_members_kernels_only(request):
  vdm = model.VDM(_digits_config(ensemble_size=2))
  params = jax.eval_shape(vdm.init, jax.random.PRNGKey(seed_of(request)),
                          jnp.zeros((2, 8, 8, 1), jnp.int32))
  mask = step.weight_decay_mask(params)["score_model"]
  for i in range(2):
    assert mask[f"member_{i}"]["conv_in"] == {"kernel": True, "bias": False}
