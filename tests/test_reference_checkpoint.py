"""vdm_jax.reference.load_clu_checkpoint reads real clu checkpoints of the reference TrainState.

The checkpoints are written by clu.checkpoint.MultihostCheckpoint (as the google-research/vdm
trainer does: <workdir>/checkpoints -> host directory checkpoints-0 with ckpt-N.flax files)
from a flax struct with the reference TrainState's serialised fields, holding the fixture's
parameters. Parity tolerances as in tests/test_reference_parity.py (fixture README).
"""
import json
from typing import Any

import flax.serialization
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm_jax import model as model_lib
from vdm_jax import reference

NAME = "learnable_scalar"


@flax.struct.dataclass
class ReferenceTrainState:
  """The pytree fields of the reference train_state.TrainState (tx_fn, apply_fn are static)."""
  step: int
  params: Any
  ema_params: Any
  opt_state: Any


def _state(params, ema_params, step):
  opt_state = optax.adamw(2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01).init(params)
  return ReferenceTrainState(step=np.int32(step), params=params, ema_params=ema_params,
                             opt_state=opt_state)


def _save(base, *states):
  """Saves states in order with MultihostCheckpoint(base) as host 0; returns base-0.

  clu.checkpoint (the trainer's extra, "pip install .[train]") imports TensorFlow: imported
  here, not at collection, it costs only the tests that write such checkpoints.
  """
  checkpoint = pytest.importorskip("clu.checkpoint")
  ckpt = checkpoint.MultihostCheckpoint(str(base), {}, host_id=0, max_to_keep=5)
  for state in states:
    ckpt.save(state)
  return base.parent / f"{base.name}-0"


@pytest.fixture(scope="module")
def setup(reference_dir):
  spec = json.loads((reference_dir / "manifest.json").read_text())["fixtures"][NAME]
  model = model_lib.VDM(reference.model_config(spec["model_config"], image_shape=(8, 8, 3)))
  raw = flax.serialization.msgpack_restore((reference_dir / f"params_{NAME}.msgpack").read_bytes())
  return model, raw["params"], spec


@pytest.fixture(scope="module")
def checkpoint_dir(setup, tmp_path_factory):
  _, params, _ = setup
  older = _state(params, jax.tree.map(lambda a: a + 1.0, params), step=100)
  newest = _state(jax.tree.map(lambda a: a - 1.0, params), params, step=200)
  return _save(tmp_path_factory.mktemp("workdir") / "checkpoints", older, newest)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_clu_wrote_the_files_the_reader_expects(checkpoint_dir):
  names = {p.name for p in checkpoint_dir.iterdir()}
  assert {"ckpt-1.flax", "ckpt-2.flax", "checkpoint"} <= names


def test_newest_ema_params_are_bitwise_the_fixture(setup, checkpoint_dir):
  model, params, _ = setup
  loaded = reference.load_clu_checkpoint(checkpoint_dir, model)
  theirs, ours = _flat(params), _flat(loaded)
  assert sorted(ours) == sorted(theirs)
  for path, value in theirs.items():
    assert ours[path].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours[path]), value, err_msg=path)


def test_which_and_number_select_params_and_older_checkpoints(setup, checkpoint_dir):
  model, params, _ = setup
  newest_params = reference.load_clu_checkpoint(checkpoint_dir, model, which="params")
  older_ema = reference.load_clu_checkpoint(str(checkpoint_dir), model, number=1)
  kernel = params["score_model"]["conv_in"]["kernel"]
  np.testing.assert_array_equal(newest_params["score_model"]["conv_in"]["kernel"], kernel - 1.0)
  np.testing.assert_array_equal(older_ema["score_model"]["conv_in"]["kernel"], kernel + 1.0)


def test_loaded_params_reproduce_the_recorded_loss_terms(setup, checkpoint_dir, reference_dir):
  model, _, spec = setup
  loaded = reference.load_clu_checkpoint(checkpoint_dir, model)
  inp = dict(np.load(reference_dir / "inputs.npz"))
  out = dict(np.load(reference_dir / f"outputs_{NAME}.npz"))
  loss_fn = jax.jit(lambda p, x, t, e, e0, c: model.loss_from_noise(p, x, t, e, e0, conditioning=c))
  _, m = loss_fn(loaded, inp["x"].astype(np.int32), inp["t"], inp["eps"], inp["eps0"],
                 jnp.asarray(inp[spec["conditioning_input"]]))
  # Same tolerances as test_reference_parity: 1e-4 relative (and 1e-4 nats absolute for the
  # reconstruction sum of 192 small log-probabilities).
  np.testing.assert_allclose(m["reconstruction"], out["loss_recon"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m["prior"], out["loss_klz"], rtol=1e-4)
  np.testing.assert_allclose(m["diffusion"], out["loss_diff"], rtol=1e-4)
  np.testing.assert_allclose(m["bpd"], out["bpd"], rtol=1e-4)


def test_a_wrong_shaped_leaf_is_refused_and_named(setup, tmp_path):
  model, params, _ = setup
  bad = jax.tree.map(lambda a: a, params)
  bad["score_model"]["dense1"]["kernel"] = np.zeros((128, 64), np.float32)
  directory = _save(tmp_path / "checkpoints", _state(params, bad, step=1))
  with pytest.raises(ValueError, match=r"leaf score_model/dense1/kernel: expected shape "
                                       r"\(128, 128\), given \(128, 64\)"):
    reference.load_clu_checkpoint(directory, model)


def test_missing_directory_files_or_number_raise_value_error(setup, checkpoint_dir, tmp_path):
  model, _, _ = setup
  with pytest.raises(ValueError, match="is not a directory"):
    reference.load_clu_checkpoint(tmp_path / "nowhere", model)
  with pytest.raises(ValueError, match="holds no ckpt-N.flax"):
    reference.load_clu_checkpoint(tmp_path, model)
  with pytest.raises(ValueError, match=r"no ckpt-7.flax; available N: \[1, 2\]"):
    reference.load_clu_checkpoint(checkpoint_dir, model, number=7)
  with pytest.raises(ValueError, match="which must be"):
    reference.load_clu_checkpoint(checkpoint_dir, model, which="opt_state")
