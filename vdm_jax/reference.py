"""Import of google-research/vdm parameters into vdm_jax.

The reference lays its parameters out as {"score_model": ScoreUNet tree,
"gamma": schedule tree} (no "gamma" for the fixed schedule), the same
layout `vdm_jax.model.VDM.init` returns for network="score_unet", so the
conversion is a validation: every leaf is checked against the tree our model
expects (names and shapes, computed with jax.eval_shape, no compilation).

  cfg = reference.model_config({"sm_n_embd": 128, "sm_n_layer": 32, ...}, image_shape=(32, 32, 3))
  model = VDM(cfg)
  params = reference.load_params("params.msgpack", model)           # or a train-state msgpack
"""
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import model as model_lib

_GAMMA_TYPES = {"fixed": "fixed_linear", "learnable_scalar": "learned_linear",
                "learnable_nnet": "learned_nnet"}
_FIELDS = {"vocab_size": "vocab_size", "sm_n_embd": "n_embd", "sm_n_layer": "n_layer",
           "sm_pdrop": "dropout", "with_attention": "with_attention",
           "with_fourier_features": "with_fourier_features", "gamma_min": "gamma_min",
           "gamma_max": "gamma_max", "sm_n_timesteps": "num_steps",
           "antithetic_time_sampling": "antithetic"}


def model_config(vdm_config, *, image_shape=(32, 32, 3), **overrides):
  """ModelConfig equivalent to a reference VDMConfig (a dict of its fields).

  gamma_type fixed / learnable_scalar / learnable_nnet become the schedules
  fixed_linear / learned_linear / learned_nnet; sm_* fields map to n_embd,
  n_layer, dropout and num_steps. Unknown reference fields are ignored
  (sm_kernel_init is unused by the reference, sample_softmax only affects decoding).
  """
  gamma_type = vdm_config.get("gamma_type", "learnable_scalar")
  if gamma_type not in _GAMMA_TYPES:
    raise ValueError(f"gamma_type must be one of {tuple(_GAMMA_TYPES)}, given {gamma_type!r}")
  fields = {ours: vdm_config[theirs] for theirs, ours in _FIELDS.items() if theirs in vdm_config}
  fields.update(network="score_unet", schedule=_GAMMA_TYPES[gamma_type], image_shape=image_shape,
                label_dropout=0.0)
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def expected_shapes(model):
  """{'/'-joined leaf path: shape} of the parameters `model` expects (jax.eval_shape)."""
  c = model.config
  x = jax.ShapeDtypeStruct((1, *c.image_shape), jnp.int32)
  tree = jax.eval_shape(lambda key, x: model.init(key, x), jax.random.PRNGKey(0), x)
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def convert_params(tree, model):
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


def load_params(path, model, *, which="ema_params"):
  """Loads reference parameters from a msgpack file and validates them against `model`.

  Accepts `msgpack_serialize({'params': tree})` (a params file) and a train
  state {'step', 'params', 'ema_params', 'opt_state'} serialised with msgpack,
  from which `which` ("ema_params", used by the reference for evaluation, or
  "params") is taken.

  Args:
    path: file path.
    model: a vdm_jax.model.VDM (its config must describe the reference model).
    which: "ema_params" or "params", for train-state files.

  Returns:
    the parameter dict for `model`.
  """
  if which not in ("params", "ema_params"):
    raise ValueError(f"which must be 'params' or 'ema_params', given {which!r}")
  with open(path, "rb") as f:
    state = flax.serialization.msgpack_restore(f.read())
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a msgpack dict, found {type(state).__name__}")
  if "ema_params" in state or "opt_state" in state:
    if which not in state:
      raise ValueError(f"{path}: train state has no {which!r} (keys: {sorted(state)})")
    state = state[which]
  return convert_params(state, model)
