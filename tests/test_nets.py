"""Score networks (vdm_jax.nets): shapes, zero inits, conditioning, low precision, bad input."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import nets
from vdm_jax.nets import layers

SMALL = {
    # n_embd 64: with 32 channels each GroupNorm group is one channel and cancels the
    # conditioning shift (see the fixture README), so gamma and labels would not matter.
    "score_unet": lambda **kw: nets.ScoreUNet(n_embd=64, n_layer=0, **kw),
    "unet": lambda **kw: nets.UNet(n_embd=32, n_layer=1, channel_mult=(1, 2),
                                   attention_resolutions=(4,), **kw),
    "dit": lambda **kw: nets.DiT(n_embd=32, n_layer=2, num_heads=2, **kw),
}


SEED = 1604


def _key(n=0):
  return jax.random.PRNGKey(SEED + n)


def test_timestep_embedding_is_sin_then_cos_of_scaled_frequencies():
  tau = np.random.default_rng(SEED).random(3).astype(np.float32)
  dim = 10
  omega = np.exp(-np.arange(5) * math.log(10_000) / 4)
  arg = 1000 * tau[:, None].astype(np.float64) * omega
  np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(tau), dim),
                             np.concatenate([np.sin(arg), np.cos(arg)], 1), atol=2e-4)


def test_fourier_features_repeat_each_channel_per_frequency():
  z = np.random.default_rng(SEED + 1).standard_normal((1, 2, 2, 3)).astype(np.float32) * 0.01
  feats = np.asarray(layers.fourier_features(jnp.asarray(z)))
  w = 2 * np.pi * 2.0 ** np.array([6, 7])
  arg = (z[..., :, None] * w).reshape(1, 2, 2, 6)  # [c0 n6, c0 n7, c1 n6, ...]
  np.testing.assert_allclose(feats, np.concatenate([np.sin(arg), np.cos(arg)], -1), atol=1e-4)


def test_fourier_features_use_the_given_exponents():
  z = np.random.default_rng(SEED + 2).standard_normal((2, 3, 3, 2)).astype(np.float32)
  exponents = (2, 3.0875, 5)  # real exponents too (grid_fourier_exponents)
  feats = np.asarray(layers.fourier_features(jnp.asarray(z), exponents=exponents))
  arg = (z[..., :, None].astype(np.float64) * 2 * np.pi * 2.0 ** np.array(exponents))
  arg = arg.reshape(2, 3, 3, 6)
  np.testing.assert_allclose(feats, np.concatenate([np.sin(arg), np.cos(arg)], -1), atol=1e-4)


@pytest.mark.parametrize("exponents", [(), ("6",), [True], (None,)])
def test_fourier_features_reject_bad_exponents(exponents):
  with pytest.raises(ValueError, match="exponents.*numbers"):
    layers.fourier_features(jnp.zeros((1, 2, 2, 1)), exponents=exponents)


def test_grid_fourier_exponents_are_the_reference_ones_at_256_levels():
  assert layers.grid_fourier_exponents(256) == (6.0, 7.0)
  top = math.log2(17 / 2)
  np.testing.assert_allclose(layers.grid_fourier_exponents(17, count=3),
                             (top - 2, top - 1, top), rtol=0, atol=1e-15)


@pytest.mark.parametrize("vocab_size, count", [(1, 2), (17.0, 2), (17, 0), (17, True)])
def test_grid_fourier_exponents_reject_bad_input(vocab_size, count):
  with pytest.raises(ValueError, match="vocab_size.*count"):
    layers.grid_fourier_exponents(vocab_size, count)


def _top_pair(f, exponents):
  """The top frequency's (sin, cos) features of the encoded values f [N]."""
  feats = np.asarray(layers.fourier_features(jnp.asarray(f, jnp.float32).reshape(-1, 1, 1, 1),
                                             exponents=exponents)).reshape(len(f), -1)
  n = len(exponents)
  return feats[:, n - 1], feats[:, 2 * n - 1]


@pytest.mark.parametrize("vocab_size", [17, 256])
def test_grid_fourier_features_read_the_offset_from_the_nearest_level(vocab_size):
  # Closed form: at f = f_k + delta, the top pair is (-1)^(V+1) (sin, cos)(pi V delta) for
  # every level k. float32: |w f| <= pi V (804 at V = 256) carries a relative rounding of a
  # few 1e-7 (f, 2 pi, the product), up to about 3e-4 in the argument; atol 1e-3.
  rng = np.random.default_rng(SEED + 4)
  k = np.arange(vocab_size)
  delta = rng.uniform(-1.0, 1.0, vocab_size) / vocab_size
  f = 2 * (k + 0.5) / vocab_size - 1 + delta
  sign = (-1.0) ** (vocab_size + 1)
  sin, cos = _top_pair(f, layers.grid_fourier_exponents(vocab_size))
  np.testing.assert_allclose(sin, sign * np.sin(np.pi * vocab_size * delta), rtol=0, atol=1e-3)
  np.testing.assert_allclose(cos, sign * np.cos(np.pi * vocab_size * delta), rtol=0, atol=1e-3)


def test_integer_exponents_are_off_the_17_level_grid():
  # The integers (2, 3) the digits config used before: their top pair at the levels
  # themselves (delta = 0) is not one constant, as the grid's is.
  f = 2 * (np.arange(17) + 0.5) / 17 - 1
  sin_int, _ = _top_pair(f, (2, 3))
  sin_grid, _ = _top_pair(f, layers.grid_fourier_exponents(17))
  assert np.max(np.abs(sin_grid)) < 1e-4
  assert np.max(np.abs(sin_int)) > 0.5


FIRST_LAYER = {"score_unet": "conv_in", "unet": "conv_in", "dit": "patch_embed"}


@pytest.mark.parametrize("name", ["unet", "dit", "score_unet"])
def test_networks_feed_fourier_features_of_the_configured_exponents(name):
  rng = np.random.default_rng(SEED + 3)
  exponents = (int(rng.integers(0, 4)), int(rng.integers(4, 8)))
  net = SMALL[name](fourier_exponents=exponents)
  z = jnp.asarray(rng.standard_normal((2, 8, 8, 1)).astype(np.float32))
  seen = []

  def record_first_layer_input(next_fun, args, kwargs, context):
    if context.module.name == FIRST_LAYER[name] and context.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  params = jax.eval_shape(net.init, _key(), z, jnp.zeros(2))
  params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), params)
  with nn.intercept_methods(record_first_layer_input):
    net.apply(params, z, jnp.zeros(2))
  w = 2 * np.pi * 2.0 ** np.array(exponents)
  arg = (np.asarray(z)[..., :, None].astype(np.float64) * w).reshape(2, 8, 8, 2)
  # float32 phases up to 2 pi 2^7 |z| ~ 2e3 carry ~1e-4 rounding error
  np.testing.assert_allclose(seen[0], np.concatenate([z, np.sin(arg), np.cos(arg)], -1),
                             atol=1e-3)


# The ScoreUNet never changes resolution, so 8 and 32 cover it; the others also run at 64.
@pytest.mark.parametrize("name, size", [(name, size) for name in ("unet", "dit", "score_unet")
                                        for size in (8, 32, 64)
                                        if not (name == "score_unet" and size == 64)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_has_the_input_shape(name, size, num_classes):
  net = SMALL[name](num_classes=num_classes)
  z = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32) if num_classes else None
  out = jax.eval_shape(lambda z, y: net.init_with_output(jax.random.PRNGKey(0), z, jnp.ones(2),
                                                         None, y)[0], z, labels)
  assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32


def random_variables(net, z, labels, rng, zero_output=False):
  """Random parameters shaped as net.init's (numpy draws: no compilation), float32.

  Kernels ~ N(0, 1 / fan_in), scales ~ 1 + N(0, 0.05^2), other leaves ~ N(0, 0.05^2);
  with zero_output the layers the networks zero-initialise at their output are zero.
  """
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), z, jnp.zeros(z.shape[0]),
                                           None, labels))

  def draw(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    shape = leaf.shape
    if zero_output and names[-2] in ("conv_out", "final_out"):
      return np.zeros(shape, np.float32)
    if names[-1] == "kernel":
      return (rng.standard_normal(shape) / math.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    offset = 1.0 if names[-1] == "scale" else 0.0
    return (offset + 0.05 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=list(SMALL))
def trained_like(request):
  """(name, net, variables, z, labels, jitted apply) of a small conditional network."""
  rng = np.random.default_rng(SEED + 4)
  net = SMALL[request.param](num_classes=10, dropout=0.5)
  z = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  labels = jnp.array([3, 10])
  variables = random_variables(net, z, labels, rng)
  return request.param, net, variables, z, labels, jax.jit(net.apply, static_argnames="train")


def test_output_layers_set_to_zero_give_the_base_prediction(trained_like):
  name, net, _, z, labels, apply = trained_like
  variables = random_variables(net, z, labels, np.random.default_rng(SEED + 5), zero_output=True)
  expected = z if name == "score_unet" else jnp.zeros_like(z)  # ScoreUNet adds z back
  np.testing.assert_array_equal(apply(variables, z, jnp.array([-5.0, 2.0]), None, labels),
                                expected)


def test_prediction_depends_on_gamma_labels_and_dropout(trained_like):
  _, _, variables, z, labels, apply = trained_like
  g = jnp.array([-5.0, 2.0])
  out = apply(variables, z, g, None, labels)
  assert float(jnp.max(jnp.abs(apply(variables, z, g + 3.0, None, labels) - out))) > 1e-3
  assert float(jnp.max(jnp.abs(apply(variables, z, g, None, labels[::-1]) - out))) > 1e-3
  dropped = apply(variables, z, g, None, labels, train=True, rngs={"dropout": _key()})
  assert float(jnp.max(jnp.abs(dropped - out))) > 1e-3


# The documented precision policy (nets/layers.py, unet.py, dit.py): with a low-precision
# dtype only the block branches' convolutions and projections compute in it; every
# normalisation, the residual stream (each block's output), the 1x1 shortcuts, the
# conditioning MLP and the input/output layers stay float32.
LOW_PRECISION = {"conv1", "conv2", "q", "k", "v", "proj_out", "qkv", "proj", "mlp_in", "mlp_out"}
# Either: the reference block's conditioning projection is part of its branch; the U-Net's
# FiLM projection is float32 (1 + scale in bfloat16 would round to steps of 2^-7). Dropout
# passes its input's dtype through.
EITHER = {"cond_proj", "Dropout_0"}
FLOAT32_CLASSES = {"GroupNorm", "LayerNorm", "ResnetBlock", "FiLMResnetBlock", "AttnBlock",
                   "DiTBlock"}
FLOAT32_NAMES = {"nin_shortcut", "dense0", "dense1", "conv_in", "conv_out", "patch_embed",
                 "final_out"}


def _output_dtypes(net, variables, z, g, labels):
  """[(module class, module name, output dtype)] of every module call of net.apply."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and hasattr(out, "dtype"):
      calls.append((type(context.module).__name__, context.module.name, out.dtype))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(net.apply, variables, z, g, None, labels)
  return calls


def test_bfloat16_runs_only_the_branch_convolutions_and_projections_in_bfloat16(trained_like):
  _, net, variables, z, labels, _ = trained_like
  calls = _output_dtypes(net.clone(dtype=jnp.bfloat16), variables, z, jnp.zeros(2), labels)
  low = [(cls, name) for cls, name, dtype in calls
         if dtype == jnp.bfloat16 and name not in EITHER]
  assert low and {name for _, name in low} <= LOW_PRECISION, low
  for cls, name, dtype in calls:
    if cls in FLOAT32_CLASSES or name in FLOAT32_NAMES:
      assert dtype == jnp.float32, (cls, name, dtype)
  branch = [(cls, name) for cls, name, _ in calls if name in LOW_PRECISION]
  assert len(low) == len(branch), set(branch) - set(low)  # every branch layer is bf16


# One rounding to bfloat16 (8 significant bits, round to nearest) has an absolute error
# uniform in +-2^-8 of the leading power of two, i.e. an RMS relative error
# RHO = 2^-8 / sqrt(3) * sqrt(E[1/m^2]) = 1.66e-3 for significands m log-uniform in [1, 2)
# (E[1/m^2] = 3 / (8 ln 2)). A bfloat16 layer rounds its input, its kernel and its output:
# sqrt(3) RHO. The output's relative error is at least a quarter of one rounding (the last
# branch's output reaches eps_hat through float32 layers of gain ~1, nothing can cancel it
# systematically) and at most twice the n layers' errors added in quadrature,
# 2 sqrt(3 n) RHO (independent roundings; residual streams and normalisations keep the
# gain of each path near 1). A float32-only network has error 0 and fails the lower bound.
RHO = 2.0**-8 / np.sqrt(3) * np.sqrt(3 / (8 * np.log(2)))


def test_bfloat16_error_lies_between_one_rounding_and_all_layers_roundings(trained_like):
  name, net, variables, _, _, apply = trained_like
  rng = np.random.default_rng(SEED + 6)
  z = jnp.asarray(rng.standard_normal((8, 8, 8, 3)), jnp.float32)
  labels, g = jnp.asarray(rng.integers(0, 11, 8)), jnp.linspace(-5.0, 2.0, 8)
  low_net = net.clone(dtype=jnp.bfloat16)
  out = apply(variables, z, g, None, labels)
  low = jax.jit(low_net.apply)(variables, z, g, None, labels).astype(jnp.float32)
  network_part = out - z if name == "score_unet" else out  # ScoreUNet adds z back in float32
  rel = float(jnp.linalg.norm(low - out) / jnp.linalg.norm(network_part))
  num_layers = sum(dtype == jnp.bfloat16 and name != "Dropout_0" for _, name, dtype in
                   _output_dtypes(low_net, variables, z, g, labels))
  assert RHO / 4 < rel < 2 * np.sqrt(3 * num_layers) * RHO, (rel, num_layers)


@pytest.mark.parametrize("name", list(SMALL))
def test_bad_inputs_raise_naming_expected_and_given(name):
  net = SMALL[name]()
  init = lambda z, g, y=None: jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(0), z, g, None, y))
  with pytest.raises(ValueError, match=r"rank 4.*given shape \(8, 8, 3\)"):
    init(jnp.zeros((8, 8, 3)), jnp.zeros(()))
  with pytest.raises(ValueError, match=r"shape \(2,\), given shape \(3,\)"):
    init(jnp.zeros((2, 8, 8, 3)), jnp.zeros(3))
  with pytest.raises(ValueError, match="num_classes=0"):
    init(jnp.zeros((2, 8, 8, 3)), jnp.zeros(2), jnp.zeros(2, jnp.int32))


def test_unet_and_dit_refuse_images_they_cannot_tile():
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda: SMALL["unet"]().init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 3)),
                                                jnp.zeros(1)))
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(lambda: SMALL["dit"]().init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 8, 3)),
                                               jnp.zeros(1)))
