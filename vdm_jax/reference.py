"""Import of google-research/vdm parameters into vdm_jax.

The reference lays its parameters out as {"score_model": ScoreUNet tree,
"gamma": schedule tree} (no "gamma" for the fixed schedule), the same
layout `vdm_jax.model.VDM.init` returns for network="score_unet", so the
conversion is a validation: every leaf is checked against the tree our model
expects (names and shapes, computed with jax.eval_shape, no compilation).

  cfg = reference.model_config({"sm_n_embd": 128, "sm_n_layer": 32, ...}, image_shape=(32, 32, 3))
  model = VDM(cfg)
  params = reference.load_params("params.msgpack", model)           # or a train-state msgpack
  params = reference.load_clu_checkpoint("gs://.../checkpoints-0", model)  # a clu checkpoint
"""
import os
import re
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vdm_jax import model as model_lib
from vdm_jax.typing import Params

_GAMMA_TYPES = {"fixed": "fixed_linear", "learnable_scalar": "learned_linear",
                "learnable_nnet": "learned_nnet"}
_FIELDS = {"vocab_size": "vocab_size", "sm_n_embd": "n_embd", "sm_n_layer": "n_layer",
           "sm_pdrop": "dropout", "with_attention": "with_attention",
           "with_fourier_features": "with_fourier_features", "gamma_min": "gamma_min",
           "gamma_max": "gamma_max", "sm_n_timesteps": "num_steps",
           "antithetic_time_sampling": "antithetic"}
_CLU_FILE = re.compile(r"^ckpt-(\d+)\.flax$")


def model_config(vdm_config: dict[str, Any], *, image_shape: tuple[int, int, int] = (32, 32, 3),
                 **overrides: Any) -> model_lib.ModelConfig:
  """ModelConfig equivalent to a reference VDMConfig (a dict of its fields).

  gamma_type fixed / learnable_scalar / learnable_nnet become the schedules
  fixed_linear / learned_linear / learned_nnet; sm_* fields map to n_embd,
  n_layer, dropout and num_steps. Unknown reference fields are ignored
  (sm_kernel_init is unused by the reference, sample_softmax only affects decoding).

  Args:
    vdm_config: the reference VDMConfig's fields, e.g. {"sm_n_embd": 128, "gamma_type": ...}.
    image_shape: (H, W, C) of the data.
    **overrides: ModelConfig fields that replace the converted ones.

  Returns:
    the ModelConfig (network "score_unet", label_dropout 0).
  """
  gamma_type = vdm_config.get("gamma_type", "learnable_scalar")
  if gamma_type not in _GAMMA_TYPES:
    raise ValueError(f"gamma_type must be one of {tuple(_GAMMA_TYPES)}, given {gamma_type!r}")
  fields = {ours: vdm_config[theirs] for theirs, ours in _FIELDS.items() if theirs in vdm_config}
  fields.update(network="score_unet", schedule=_GAMMA_TYPES[gamma_type], image_shape=image_shape,
                label_dropout=0.0)
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def expected_shapes(model: model_lib.VDM) -> dict[str, tuple[int, ...]]:
  """{'/'-joined leaf path: shape} of the parameters `model` expects (jax.eval_shape)."""
  c = model.config
  x = jax.ShapeDtypeStruct((1, *c.image_shape), jnp.int32)
  tree = jax.eval_shape(lambda key, x: model.init(key, x), jax.random.PRNGKey(0), x)
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def convert_params(tree: dict, model: model_lib.VDM) -> Params:
  """Validates a reference parameter tree against `model` and returns it as float32 arrays.

  Args:
    tree: nested dict {"score_model": ..., "gamma": ...}, or {"params": that}.
    model: a vdm_jax.model.VDM.

  Returns:
    the parameter dict for `model` (nested dict of float32 jnp arrays).

  Raises:
    ValueError naming every missing, extra or mis-shaped leaf (expected vs given shape).
  """
  if not isinstance(tree, dict):
    raise ValueError(f"expected a nested dict of parameters, given {type(tree).__name__}")
  if set(tree) == {"params"}:
    tree = tree["params"]
  given = {p: np.asarray(v) for p, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}
  expected = expected_shapes(model)
  problems = [f"missing leaf {p} (expected shape {s})" for p, s in sorted(expected.items())
              if p not in given]
  problems += [f"extra leaf {p} (shape {given[p].shape})" for p in sorted(given)
               if p not in expected]
  problems += [f"leaf {p}: expected shape {expected[p]}, given {given[p].shape}"
               for p in sorted(set(given) & set(expected)) if given[p].shape != expected[p]]
  problems += [f"leaf {p}: expected floating point values, given dtype {given[p].dtype}"
               for p in sorted(set(given) & set(expected))
               if not np.issubdtype(given[p].dtype, np.floating)]
  if problems:
    raise ValueError("parameters do not match the model:\n  " + "\n  ".join(problems))
  flat = {tuple(p.split("/")): jnp.asarray(v, jnp.float32) for p, v in given.items()}
  return flax.traverse_util.unflatten_dict(flat)


def _params_from_state(state, model, which, source):
  """Picks `which` from a restored train state (or takes a params tree) and validates it."""
  if which not in ("params", "ema_params"):
    raise ValueError(f"which must be 'params' or 'ema_params', given {which!r}")
  if not isinstance(state, dict):
    raise ValueError(f"{source}: expected a msgpack dict, found {type(state).__name__}")
  if "ema_params" in state or "opt_state" in state:
    if which not in state:
      raise ValueError(f"{source}: train state has no {which!r} (keys: {sorted(state)})")
    state = state[which]
  return convert_params(state, model)


def load_params(path: str | os.PathLike, model: model_lib.VDM, *,
                which: str = "ema_params") -> Params:
  """Loads reference parameters from a msgpack file and validates them against `model`.

  Accepts `msgpack_serialize({'params': tree})` (a params file) and a train
  state {'step', 'params', 'ema_params', 'opt_state'} serialised with msgpack,
  from which `which` ("ema_params", used by the reference for evaluation, or
  "params") is taken.

  Args:
    path: file path (local, or gs:// etc. through etils.epath).
    model: a vdm_jax.model.VDM (its config must describe the reference model).
    which: "ema_params" or "params", for train-state files.

  Returns:
    the parameter dict for `model`.
  """
  state = flax.serialization.msgpack_restore(epath.Path(path).read_bytes())
  return _params_from_state(state, model, which, path)


def _clu_checkpoint_files(directory: str | os.PathLike) -> dict[int, epath.Path]:
  """{N: path} of the `ckpt-N.flax` files in a clu checkpoint directory (local or gs://)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise ValueError(f"{directory} is not a directory; pass the clu checkpoint directory that "
                     "holds ckpt-N.flax files (for google-research/vdm: <workdir>/checkpoints-0)")
  matches = ((_CLU_FILE.match(path.name), path) for path in directory.iterdir())
  return {int(match.group(1)): path for match, path in matches if match}


def load_clu_checkpoint(directory: str | os.PathLike, model: model_lib.VDM, *,
                        which: str = "ema_params", number: int | None = None) -> Params:
  """Parameters from a clu checkpoint directory of the original google-research/vdm trainer.

  clu.checkpoint (Multihost)Checkpoint writes, per save, `ckpt-N.flax` (N = 1, 2, ... counts
  saves, it is not the training step) holding flax.serialization.to_bytes of the reference
  TrainState {'step', 'params', 'ema_params', 'opt_state'} next to TensorFlow files that
  hold no parameters. The released checkpoints are such directories, e.g.
  gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0. Bytes are read through
  etils.epath (local paths, and gs:// where credentials exist); only the .flax file is read.
  Every leaf is validated as by `load_params` / `convert_params`.

  Args:
    directory: the checkpoint directory (holding ckpt-N.flax), local or gs://.
    model: a vdm_jax.model.VDM whose config describes the reference model (`model_config`).
    which: "ema_params" (what the reference evaluates) or "params".
    number: N of the ckpt-N.flax to read; None reads the newest (largest N).

  Returns:
    the parameter dict for `model` (nested dict of float32 arrays).

  Raises:
    ValueError when the directory holds no ckpt-N.flax, N is absent, or a leaf is missing,
    extra or mis-shaped (named, expected vs given shape).
  """
  files = _clu_checkpoint_files(directory)
  if not files:
    raise ValueError(f"{directory} holds no ckpt-N.flax file; pass the directory clu wrote "
                     "them to (for google-research/vdm: <workdir>/checkpoints-0)")
  number = max(files) if number is None else number
  if number not in files:
    raise ValueError(f"{directory} has no ckpt-{number}.flax; available N: {sorted(files)}")
  state = flax.serialization.msgpack_restore(files[number].read_bytes())
  return _params_from_state(state, model, which, files[number])
