"""Every config loads, holds exactly ModelConfig's fields and trains one real step."""
import dataclasses
import importlib
import pathlib

import jax
import numpy as np
from PIL import Image
import pytest

from vdm_jax.train import data
from vdm_jax import model as model_lib
from vdm_jax import train
from vdm_jax.train import config as config_lib

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob(
    "*.py") if p.stem not in ("__init__", "default"))


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_all_experiment_configs_are_listed():
  assert {"cifar10", "digits", "digits_cond", "mnist", "fashion_mnist", "imagenet32",
          "imagenet64", "image_folder"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS + ["default"])
def test_config_model_fields_are_exactly_model_config_fields(name):
  config = _load(name)
  assert set(config.model.keys()) == {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  config_lib.create_model(config)  # ModelConfig validation accepts it


@pytest.mark.parametrize("name", CONFIGS)
def test_config_docstring_shows_the_command_that_runs_it(name):
  module = importlib.import_module(f"configs.{name}")
  assert f"python main.py --config=configs/{name}.py --workdir=" in module.__doc__


def test_cifar10_config_is_the_vdm_paper_setup():
  c = _load("cifar10")
  assert (c.model.network, c.model.n_layer, c.model.n_embd) == ("score_unet", 32, 128)
  assert (c.model.with_attention, c.model.dropout, c.model.schedule) == (False, 0.1,
                                                                         "learned_linear")
  assert (c.model.gamma_min, c.model.gamma_max, c.model.num_steps, c.model.antithetic) == (
      -13.3, 5.0, 0, True)
  o = c.optimizer
  assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.warmup_steps, o.ema_decay) == (
      2e-4, 0.9, 0.99, 0.01, 100, 0.9999)
  assert (c.training.batch_size, c.training.num_steps) == (128, 10_000_000)


def _tiny(config, tmp_path):
  m = config.model
  m.n_embd, m.n_layer, m.with_attention, m.with_fourier_features = 32, 0, False, False
  if m.network == "unet":
    m.n_layer, m.channel_mult, m.attention_resolutions = 0, (1,), ()
  config.training.batch_size = 2
  if config.data.dataset == "image_folder":
    rng = np.random.default_rng(1612)
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (10, 12, 3)).astype(np.uint8)).save(
          tmp_path / f"{i}.png")
    config.data.path = str(tmp_path)
    config.model.image_shape = (8, 8, 3)
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_one_real_train_step_for_every_config(name, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _tiny(_load(name), tmp_path)
  with tfds.testing.mock_data(num_examples=4):
    source = data.load_sources(config, ("train",))["train"]
    batch = next(data.train_iterator(source, batch_size=2, seed=0, num_threads=0))
  assert batch["image"].shape[1:] == tuple(config.model.image_shape)
  setup = train.get_setup(config)
  state, metrics = setup.train_step(setup.init_state(), setup.global_batch(batch))
  assert int(state.step) == 1 and np.isfinite(float(metrics["bpd"]))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
