"""The VDM trainer: `python main.py --config=... --workdir=...` calls these.

  config = vdm_jax.train.default_config()          # or configs/<name>.get_config()
  metrics = vdm_jax.train.train_and_evaluate(config, workdir)
  setup, step, state = vdm_jax.train.restore(config, workdir)   # the trained state
  vdm_jax.train.evaluate(config, workdir)          # test bits/dim of a checkpoint
  vdm_jax.train.sample(config, workdir)            # sample grids, .npy, GIF
  vdm_jax.train.request_stop(143)                  # in a SIGTERM handler: stop after this step

Modules: config (base config, validation), errors (typed errors), step (the pure train
step, state, optimizer, EMA), setup (mesh, shardings, compiled step of one config),
loop (the training loop), inference (restore, evaluate, sample), checkpoints, lock
(the workdir lock), data (sources and batches), artifacts (pictures), performance
(FLOPs and utilisation).
"""
from vdm_jax.train.config import default_config
from vdm_jax.train.config import validate_config
from vdm_jax.train.errors import CheckpointError
from vdm_jax.train.errors import ConfigError
from vdm_jax.train.errors import TrainingError
from vdm_jax.train.inference import evaluate
from vdm_jax.train.inference import restore
from vdm_jax.train.inference import sample
from vdm_jax.train.loop import request_stop
from vdm_jax.train.loop import train_and_evaluate
from vdm_jax.train.setup import Setup
from vdm_jax.train.setup import get_setup
from vdm_jax.train.setup import use_cpu_devices

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Setup",
    "TrainingError",
    "default_config",
    "evaluate",
    "get_setup",
    "request_stop",
    "restore",
    "sample",
    "train_and_evaluate",
    "use_cpu_devices",
    "validate_config",
]
