"""vdm_jax.reference: loading google-research/vdm parameters, and refusing wrong ones."""
import json

import flax.serialization
import jax
import numpy as np
import pytest

from vdm_jax import model as model_lib
from vdm_jax import reference

NAME = "learnable_scalar"


@pytest.fixture(scope="module")
def setup(reference_dir):
  spec = json.loads((reference_dir / "manifest.json").read_text())["fixtures"][NAME]
  model = model_lib.VDM(reference.model_config(spec["model_config"], image_shape=(8, 8, 3)))
  raw = flax.serialization.msgpack_restore((reference_dir / f"params_{NAME}.msgpack").read_bytes())
  return model, raw["params"]


def _write(tmp_path, tree):
  path = tmp_path / "state.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(tree))
  return path


def test_cifar10_paper_network_has_the_reference_parameter_count():
  cfg = model_lib.ModelConfig(n_embd=128, n_layer=32, with_attention=False,
                              with_fourier_features=True, schedule="learned_linear",
                              image_shape=(32, 32, 3))
  shapes = reference.expected_shapes(model_lib.VDM(cfg))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 30578181


def test_expected_tree_equals_the_fixture_listing(setup, reference_dir):
  model, _ = setup
  listed = {}
  for line in (reference_dir / f"params_{NAME}.txt").read_text().splitlines():
    if line.startswith("params/"):
      path, shape = line.split("\t")[:2]
      listed[path[len("params/"):]] = tuple(json.loads(shape.replace("(", "[").replace(",)", "]")
                                                       .replace(")", "]")))
  assert reference.expected_shapes(model) == listed


def test_train_state_file_yields_the_chosen_params_or_ema_params(setup, tmp_path):
  model, params = setup
  ema = jax.tree.map(lambda a: a + 1.0, params)
  path = _write(tmp_path, {"step": 7, "params": params, "ema_params": ema, "opt_state": {}})
  got_ema = reference.load_params(path, model)
  got = reference.load_params(path, model, which="params")
  np.testing.assert_array_equal(got_ema["gamma"]["b"], ema["gamma"]["b"])
  np.testing.assert_array_equal(got["score_model"]["conv_in"]["kernel"],
                                params["score_model"]["conv_in"]["kernel"])


def _drop(tree, *path):
  tree = jax.tree.map(lambda a: a, tree)
  node = tree
  for key in path[:-1]:
    node = node[key]
  return tree, node, path[-1]


def test_missing_extra_and_misshaped_leaves_are_each_named(setup):
  model, params = setup
  tree, node, leaf = _drop(params, "score_model", "dense0", "bias")
  del node[leaf]
  tree["score_model"]["conv_in"]["kernel"] = np.zeros((3, 3, 3, 32), np.float32)
  tree["score_model"]["extra_layer"] = {"kernel": np.zeros((2,), np.float32)}
  with pytest.raises(ValueError) as err:
    reference.convert_params(tree, model)
  msg = str(err.value)
  assert "missing leaf score_model/dense0/bias (expected shape (128,))" in msg
  assert "extra leaf score_model/extra_layer/kernel" in msg
  assert "score_model/conv_in/kernel: expected shape (3, 3, 15, 32), given (3, 3, 3, 32)" in msg


def test_train_state_without_the_requested_entry_is_refused(setup, tmp_path):
  model, params = setup
  path = _write(tmp_path, {"step": 1, "params": params, "opt_state": {}})
  with pytest.raises(ValueError, match="ema_params"):
    reference.load_params(path, model)


def test_unknown_reference_gamma_type_is_refused():
  with pytest.raises(ValueError, match="gamma_type"):
    reference.model_config({"gamma_type": "learnable_cosine"})
