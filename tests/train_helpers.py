"""Shared helpers of the trainer tests: a tiny digits config and workdir snapshots."""
import hashlib
import os

from configs import digits


def tiny_config(num_steps=20):
  """configs/digits with a 32-wide, 0-block network: a real step compiles in seconds."""
  config = digits.get_config()
  config.model.n_embd = 32
  config.model.n_layer = 0
  config.model.with_fourier_features = False
  config.training.num_steps = num_steps
  config.training.batch_size = 8
  config.training.log_every = 5
  config.training.eval_every = 0
  config.training.checkpoint_every = 5
  config.training.keep_checkpoints = 5
  config.optimizer.warmup_steps = 2
  config.eval.batch_size = 16
  config.eval.num_examples = 24
  config.sample.num_images = 4
  config.sample.num_steps = 6
  config.sample.gif_frames = 3
  return config


def snapshot(folder):
  """{relative path: sha256 of the file (or "<dir>")} of everything under `folder`."""
  result = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      result[os.path.relpath(os.path.join(root, name), folder)] = "<dir>"
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return result
