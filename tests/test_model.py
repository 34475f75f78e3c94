"""vdm_jax.model: config validation, init layout, the bound, guidance, input checks."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import decoders
from vdm_jax import losses
from vdm_jax import model as model_lib
from vdm_jax import time_sampling

TINY = dict(image_shape=(8, 8, 3), n_embd=32, n_layer=0, with_fourier_features=False,
            dropout=0.0)


def _model(**kw):
  return model_lib.VDM(model_lib.ModelConfig(**{**TINY, **kw}))


def _x(rng, batch=2, vocab=256):
  return rng.integers(0, vocab, (batch, 8, 8, 3)).astype(np.int32)


def _random_params(model, rng):
  """Random float32 params shaped as model.init's, drawn with numpy (no compilation)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *model.config.image_shape), jnp.int32))

  def draw(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    if names[0] == "gamma":  # keep the schedule at its init (reasonable endpoints)
      return None
    scale = 1 / math.sqrt(np.prod(leaf.shape[:-1])) if names[-1] == "kernel" else 0.05
    offset = 1.0 if names[-1] == "scale" else 0.0
    return (offset + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  if "gamma" in shapes:
    params["gamma"] = model.schedule.init(jax.random.PRNGKey(0), jnp.zeros(1))["params"]
  return params


@pytest.mark.parametrize("field, value, words", [
    ("vocab_size", 1, "vocab_size"), ("image_shape", (8, 8), "image_shape"),
    ("network", "resnet", "network"), ("schedule", "sqrt", "schedule"),
    ("dtype", "float64", "dtype"), ("gamma_max", -20.0, "gamma_max"),
    ("num_steps", -1, "num_steps"), ("dropout", 1.0, "dropout"),
    ("variance_minimising", True, "variance_minimising"), ("n_embd", 48, "n_embd"),
    ("fourier_exponents", (), "fourier_exponents"),
    ("fourier_exponents", ("6",), "fourier_exponents"),
    ("fourier_exponents", (-1, 3), "fourier_exponents"),
    ("fourier_exponents", (17.5,), "fourier_exponents"), ("grid_skip", 1, "grid_skip"),
    ("grid_prior", 1, "grid_prior"), ("grid_prior", True, "grid_prior.*grid_skip"),
    ("grid_logits", 1, "grid_logits"),
    ("time_proposal", (0.5, 0.6), "time_proposal"), ("time_proposal", (0.0, 1.0), "time_proposal"),
])
def test_invalid_config_raises_naming_the_field_and_the_value(field, value, words):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{words}.*given {value!r}".replace("(", r"\(")
                     .replace(")", r"\)")):
    model_lib.ModelConfig(**{**TINY, field: value})


def test_fourier_exponents_keep_real_values_and_make_numpy_ints_python_ints():
  config = model_lib.ModelConfig(**{**TINY, "fourier_exponents": (np.int64(2), 3.0875)})
  assert config.fourier_exponents == (2, 3.0875)
  assert [type(n) for n in config.fourier_exponents] == [int, float]


def test_network_specific_geometry_is_validated():
  with pytest.raises(ValueError, match="image_shape.*divisible by 8"):
    model_lib.ModelConfig(**{**TINY, "network": "unet", "image_shape": (12, 12, 3)})
  with pytest.raises(ValueError, match="patch_size"):
    model_lib.ModelConfig(**{**TINY, "network": "dit", "patch_size": 3})
  with pytest.raises(ValueError, match="ModelConfig"):
    model_lib.VDM({"n_embd": 32})


@pytest.mark.parametrize("schedule, has_gamma", [("fixed_linear", False), ("cosine", False),
                                                 ("learned_linear", True), ("learned_nnet", True),
                                                 ("learned_monotone", True)])
@pytest.mark.parametrize("network", ["score_unet", "unet", "dit"])
def test_init_returns_float32_params_in_the_reference_layout(schedule, has_gamma, network):
  m = _model(schedule=schedule, network=network, channel_mult=(1, 2), num_classes=3)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.int32)
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
  assert set(params) == ({"score_model", "gamma"} if has_gamma else {"score_model"})
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  assert "label_emb" in params["score_model"]


def test_at_init_the_score_unet_predicts_its_input_and_the_bound_is_consistent():
  rng = np.random.default_rng(1621)
  m = _model()
  x = _x(rng)
  key = jax.random.PRNGKey(rng.integers(2**31))
  params = jax.jit(m.init)(key, x)
  z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  np.testing.assert_array_equal(jax.jit(lambda p: m.eps_fn(p)(z, jnp.float32(0.3)))(params), z)
  loss, metrics = jax.jit(lambda p, x, k: m.loss(p, x, k))(params, x, key)
  assert loss.shape == (2,) and set(metrics) == {"prior", "reconstruction", "diffusion", "bpd"}
  np.testing.assert_allclose(metrics["bpd"], loss / (192 * math.log(2)), rtol=1e-6)
  # Same draws as the core's vdm_loss (key split: noise first), term by term.
  key_noise, _ = jax.random.split(key)
  core, core_terms = jax.jit(lambda p: losses.vdm_loss(m.eps_fn(p), m.gamma_fn(p), x, key_noise))(
      params)
  np.testing.assert_allclose(loss, core, rtol=1e-5)
  # The decoder's log p moves by ~2e-5 nats per pixel when z_0 / alpha_0 moves by an ulp
  # (1e-4 of its width sigma_0 / alpha_0): 192 pixels, 4e-3 nats.
  for name, value in core_terms.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=4e-3, err_msg=name)


def test_grid_skip_adds_the_grid_noise_estimate_to_the_network_output():
  # The U-Net's output conv is zero at init: eps_hat is then the grid's estimate alone;
  # with random params it is the network's output plus that estimate.
  rng = np.random.default_rng(1622)
  kw = dict(network="unet", channel_mult=(1,), attention_resolutions=(), vocab_size=17,
            image_shape=(8, 8, 1))
  plain, skip = _model(**kw), _model(grid_skip=True, **kw)
  x = rng.integers(0, 17, (2, 8, 8, 1)).astype(np.int32)
  z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  gamma = jnp.asarray([-7.0, 2.0])
  grid = decoders.grid_noise_estimate(z, gamma, 17)
  params = skip.init(jax.random.PRNGKey(3), x)
  np.testing.assert_array_equal(skip.eps_fn(params)(z, gamma), grid)
  params = _random_params(skip, rng)
  np.testing.assert_allclose(skip.eps_fn(params)(z, gamma), plain.eps_fn(params)(z, gamma) + grid,
                             rtol=1e-6, atol=1e-6)


def test_grid_prior_is_a_learned_per_pixel_prior_of_the_grid_skip():
  # Zero logits at init (the uniform prior, the same eps_hat as grid_skip alone); any logits
  # enter decoders.grid_noise_estimate as the prior, and the bound's gradient reaches them.
  rng = np.random.default_rng(1623)
  kw = dict(network="unet", channel_mult=(1,), attention_resolutions=(), vocab_size=17,
            image_shape=(8, 8, 1), grid_skip=True)
  skip, learned = _model(**kw), _model(grid_prior=True, **kw)
  x = rng.integers(0, 17, (2, 8, 8, 1)).astype(np.int32)
  z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  gamma = jnp.asarray([-7.0, 2.0])
  # Jitted where no comparison is to a few ulps: op by op, these took about 3x longer.
  eps = jax.jit(lambda model, p: model.eps_fn(p)(z, gamma), static_argnums=0)
  params = jax.jit(learned.init)(jax.random.PRNGKey(3), x)
  np.testing.assert_array_equal(params["grid_prior"], np.zeros((8, 8, 1, 17)))
  np.testing.assert_array_equal(eps(learned, params), eps(skip, params))
  params = _random_params(learned, rng)
  # Op by op, like the learned model's prediction below: a tolerance of 1e-6 is a few ulps.
  net = _model(**{**kw, "grid_skip": False}).eps_fn(params)(z, gamma)
  grid = decoders.grid_noise_estimate(z, gamma, 17, params["grid_prior"])
  np.testing.assert_allclose(learned.eps_fn(params)(z, gamma), net + grid, rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: learned.loss(p, x, jax.random.PRNGKey(0))[0].mean()))(params)
  assert np.all(np.isfinite(grads["grid_prior"])) and np.any(grads["grid_prior"] != 0)


@pytest.mark.parametrize("network, extra", [
    ("score_unet", {}), ("unet", dict(channel_mult=(1,), attention_resolutions=())),
    ("dit", dict(patch_size=2, num_heads=2)),
])
def test_grid_logits_are_the_networks_per_value_logits_over_the_grid(network, extra):
  # Zero output layer at init: eps_hat is the grid estimate under the prior alone (the
  # score_unet does not add z back). Output bias logits of +40 on level v_c for channel c
  # (channel-major: c * V + v) make E[x | z] = enc(v_c) at gamma = 2 (alpha / sigma^2 |z|
  # enc spread << 40), so eps_hat = (z - alpha enc(v_c)) / sigma, channel by channel.
  rng = np.random.default_rng(1624)
  kw = dict(network=network, vocab_size=17, grid_prior=True, **extra)
  logits_model = _model(grid_logits=True, **kw)
  x = rng.integers(0, 17, (2, 8, 8, 3)).astype(np.int32)
  z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  gamma = jnp.asarray([-7.0, 2.0])
  params = logits_model.init(jax.random.PRNGKey(3), x)
  np.testing.assert_allclose(logits_model.eps_fn(params)(z, gamma),
                             decoders.grid_noise_estimate(z, gamma, 17, params["grid_prior"]),
                             rtol=1e-6, atol=1e-6)
  levels = np.array([3, 16, 0])
  out = "final_out" if network == "dit" else "conv_out"
  bias = np.zeros(params["score_model"][out]["bias"].shape, np.float32).reshape(-1, 3 * 17)
  bias[:, np.arange(3) * 17 + levels] = 40.0
  params["score_model"][out]["bias"] = jnp.asarray(bias.ravel())
  g = jnp.full((2,), 2.0)
  alpha, sigma = np.sqrt(jax.nn.sigmoid(-2.0)), np.sqrt(jax.nn.sigmoid(2.0))
  expected = (np.asarray(z) - alpha * np.asarray(decoders.encode(levels, 17))) / sigma
  np.testing.assert_allclose(logits_model.eps_fn(params)(z, g), expected, rtol=1e-5, atol=1e-5)


def test_grid_logits_exclude_grid_skip():
  with pytest.raises(ValueError, match=r"ModelConfig\.grid_logits.*grid_skip"):
    model_lib.ModelConfig(network="unet", grid_logits=True, grid_skip=True)


def test_a_time_proposal_gives_the_importance_sampled_bound_of_the_core():
  # model.loss with time_proposal q: t = quantile(q, u), diffusion / q(t), with the draws of
  # vdm_jax.time_sampling.vdm_loss (whose unbiasedness tests/test_time_sampling.py checks).
  rng = np.random.default_rng(1622)
  probs = rng.uniform(0.2, 1.0, 8)
  probs = tuple(float(p) for p in probs / probs.sum())
  m = _model(time_proposal=probs)
  plain = _model()
  x = _x(rng, batch=4)
  params = _random_params(m, rng)
  key = jax.random.PRNGKey(rng.integers(2**31))
  loss, metrics = jax.jit(lambda p: m.loss(p, x, key, train=False))(params)
  key_noise, _ = jax.random.split(key)
  proposal = time_sampling.TimeProposal(jnp.asarray(probs, jnp.float32))
  core, core_terms = jax.jit(lambda p: time_sampling.vdm_loss(
      m.eps_fn(p), m.gamma_fn(p), x, key_noise, proposal))(params)
  np.testing.assert_allclose(loss, core, rtol=1e-5)
  np.testing.assert_allclose(metrics["diffusion"], core_terms["diffusion"], rtol=1e-5)
  np.testing.assert_allclose(metrics["bpd"], loss / (192 * math.log(2)), rtol=1e-6)
  # The weights matter: without the proposal the same key gives other times and terms.
  plain_loss, _ = jax.jit(lambda p: plain.loss(p, x, key, train=False))(params)
  assert np.all(np.abs(np.asarray(plain_loss) - np.asarray(loss)) > 1e-3 * np.abs(plain_loss))
  with pytest.raises(ValueError, match="time_proposal.*num_steps"):
    model_lib.ModelConfig(**{**TINY, "time_proposal": probs, "num_steps": 10})


def test_loss_is_float32_with_bfloat16_compute():
  m = _model(dtype="bfloat16", num_classes=4)
  params = _random_params(m, np.random.default_rng(1622))
  loss, metrics = jax.eval_shape(lambda p, x, k: m.loss(p, x, k, labels=jnp.zeros(2, jnp.int32)),
                                 params, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.uint8),
                                 jax.random.PRNGKey(0))
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())


def test_model_config_dtype_reaches_the_network():
  # ModelConfig(dtype=...) must arrive at the network: the same params give eps_hat that
  # differs from the float32 model's by bfloat16 rounding (nonzero, and far below the
  # prediction's own size: test_nets bounds it from both sides for each network).
  rng = np.random.default_rng(1624)
  m32, m16 = _model(n_embd=64), _model(n_embd=64, dtype="bfloat16")
  assert m16.network.dtype == jnp.bfloat16 and m32.network.dtype == jnp.float32
  params = _random_params(m32, rng)
  z = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  g = jnp.array([-3.0, 1.0])
  eps32, eps16 = m32.eps_fn(params)(z, g), m16.eps_fn(params)(z, g)
  assert eps16.dtype == jnp.float32
  error = float(jnp.max(jnp.abs(eps16 - eps32)))
  assert 0.0 < error < 0.1 * float(jnp.max(jnp.abs(eps32)))


def test_guided_eps_is_the_cfg_combination_of_conditional_and_null_predictions():
  rng = np.random.default_rng(1623)
  m = _model(n_embd=64, num_classes=5)
  params = _random_params(m, rng)
  z = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  labels, w, g = jnp.array([1, 4]), 1.5, jnp.array([-3.0, 1.0])
  eps_c = m.eps_fn(params, labels=labels)(z, g)
  eps_null = m.eps_fn(params)(z, g)
  assert float(jnp.max(jnp.abs(eps_c - eps_null))) > 1e-3
  guided = m.eps_fn(params, labels=labels, guidance_weight=w)(z, g)
  np.testing.assert_allclose(guided, (1 + w) * eps_c - w * eps_null, atol=1e-4)


def test_variance_minimising_keeps_the_value_and_gives_the_shape_the_second_moment_gradient():
  rng = np.random.default_rng(3)
  m_vm = _model(schedule="learned_monotone", variance_minimising=True)
  m = model_lib.VDM(dataclasses.replace(m_vm.config, variance_minimising=False))
  params = _random_params(m, rng)
  x, t = _x(rng), jnp.asarray(rng.uniform(0.05, 0.95, 2), jnp.float32)
  eps, eps0 = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for _ in range(2))

  def objective(model, power):
    def f(p):
      _, metrics = model.loss_from_noise(p, x, t, eps, eps0)
      return jnp.sum(metrics["diffusion"] ** power)
    return jax.jit(jax.value_and_grad(f))(params)

  value_vm, grad_vm = objective(m_vm, 1)
  value, grad = objective(m, 1)
  _, grad_sq = objective(m, 2)
  np.testing.assert_allclose(value_vm, value, rtol=1e-5)
  for leaf in ("b", "w"):  # endpoints keep the ordinary gradient
    np.testing.assert_allclose(grad_vm["gamma"][leaf], grad["gamma"][leaf], rtol=1e-4)
  # The shape net gets d sum(L^2) = sum_b 2 L_b dL_b (2 L ~ 5e3 here). Its entries are float32
  # sums whose terms cancel (the shape is normalised between fixed endpoints) down to ~1e-5,
  # a few ulp of the terms: each float32 route to the same exact value carries noise of
  # that size. It is measured between two exact routes that share no variance-minimising
  # code: autodiff of sum L^2, and the per-example Jacobian combined as sum_b 2 L_b J_b in
  # float64. Three independent roundings of one size: the variance-minimising gradient must
  # be within 3 times that noise of the float64 combination. A missing factor 2, or L in
  # place of L^2, is off by 50 % or more. (The first layer l1, one weight and one bias, sums
  # over everything downstream and cancels below float32 resolution: the two exact routes
  # disagree there by 100 %, so it cannot be compared in float32.)
  def diffusion(p):
    return m.loss_from_noise(p, x, t, eps, eps0)[1]["diffusion"]

  losses_b, jacobian = jax.jit(lambda p: (diffusion(p), jax.jacrev(diffusion)(p)))(params)
  two_l = 2.0 * np.asarray(losses_b, np.float64)
  for name in ("l2", "l3"):
    assert jax.tree.structure(grad_vm["gamma"][name]) == jax.tree.structure(grad_sq["gamma"][name])
    for vm, sq, jac in zip(jax.tree.leaves(grad_vm["gamma"][name]),
                           jax.tree.leaves(grad_sq["gamma"][name]),
                           jax.tree.leaves(jacobian["gamma"][name]), strict=True):
      combined = np.tensordot(two_l, np.asarray(jac, np.float64), axes=1)
      noise = np.linalg.norm(sq - combined)
      assert noise < 0.1 * np.linalg.norm(combined), name  # the comparison can see 50 %
      assert np.linalg.norm(vm - combined) <= 3 * noise, name


def test_bad_data_and_labels_raise_saying_expected_and_given():
  rng = np.random.default_rng(1624)
  m = _model(num_classes=3)
  init = lambda x, labels=None: m.init(jax.random.PRNGKey(0), x, labels)
  with pytest.raises(ValueError, match=r"shape \[B, 8, 8, 3\].*given shape \(8, 8, 3\)"):
    init(_x(rng)[0])
  with pytest.raises(ValueError, match=r"given shape \(2, 8, 8, 1\)"):
    init(_x(rng)[..., :1])
  with pytest.raises(ValueError, match="integers.*given dtype float32"):
    init(_x(rng).astype(np.float32))
  with pytest.raises(ValueError, match=r"vocab_size=16.*max 2\d\d"):
    _model(vocab_size=16).check_x(np.full((1, 8, 8, 3), 255))
  with pytest.raises(ValueError, match=r"\[0, 3\), given min 0, max 3"):
    m.check_labels(np.array([0, 3]), 2)
  with pytest.raises(ValueError, match=r"shape \(2,\), given int\d+ \(3,\)"):
    m.check_labels(np.array([0, 1, 2]), 2)
  with pytest.raises(ValueError, match="num_classes is 0"):
    _model().check_labels(np.array([0, 1]), 2)


def test_labels_and_data_closed_over_inside_jit_are_checked_without_concretization_errors():
  rng = np.random.default_rng(1625)
  m = _model(n_embd=64, num_classes=5)
  params = _random_params(m, rng)
  labels = jnp.asarray(rng.integers(0, 5, 2), jnp.int32)
  z, g = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32), jnp.array([-3.0, 1.0])
  eager = m.eps_fn(params, labels=labels, guidance_weight=1.0)(z, g)
  jitted = jax.jit(lambda p, z: m.eps_fn(p, labels=labels, guidance_weight=1.0)(z, g))(params, z)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  bad = jnp.array([0, 6])  # 5 is the null label, which eps_fn accepts
  with pytest.raises(ValueError, match=r"\[0, 6\), given min 0, max 6"):
    jax.jit(lambda p, z: m.eps_fn(p, labels=bad)(z, g))(params, z)
