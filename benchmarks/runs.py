"""What the benchmark scripts share about configs and trained runs: one loader for each.

  config = runs.load_config("configs/digits.py")
  config, setup, step, state = runs.restore("configs/digits.py", "/tmp/vdm_digits")
  images = runs.split_images(config)  # {"train": int32 [N, H, W, C], "test": [M, H, W, C]}
"""
import importlib
import pathlib
import sys
from typing import Sequence

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdm_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax.train import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def load_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file given as main.py takes it ("configs/digits.py")."""
  return importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config()


def restore(config_path: str, workdir: str) -> tuple[ml_collections.ConfigDict, train.Setup, int,
                                                     step_lib.TrainState]:
  """(config, setup, step, state) of the newest checkpoint of a run of config_path in workdir."""
  config = load_config(config_path)
  setup, step, state = train.restore(config, workdir)
  return config, setup, step, state


def split_images(config: ml_collections.ConfigDict, splits: Sequence[str] = ("train", "test"),
                 batch_size: int = 512) -> dict[str, np.ndarray]:
  """Every image of each split of config's dataset: {split: int32 [N, H, W, C]}, in order."""
  sources = data.load_sources(config, tuple(splits))
  return {name: np.concatenate([b["image"] for b in data.eval_batches(sources[name],
                                                                       batch_size=batch_size)])
          for name in splits}
