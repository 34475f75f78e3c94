"""A workdir records its config; a resume with a changed config is refused unless allowed."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from vdm_jax import train
from vdm_jax.train import run_record
from train_helpers import snapshot
from train_helpers import TINY_MODEL_FLAGS
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
  """A finished 5-step run of tiny_config (checkpoint 5) and its config."""
  workdir = tmp_path_factory.mktemp("five")
  config = tiny_config(num_steps=5)
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _copy(workdir, tmp_path):
  copy = tmp_path / "workdir"
  shutil.copytree(workdir, copy)
  return copy


def _recorded(workdir):
  return json.loads((workdir / run_record.CONFIG_FILE).read_text())


def _changes(workdir):
  path = workdir / run_record.CHANGES_FILE
  return [json.loads(line)["changes"] for line in path.read_text().splitlines()]


def test_diff_names_each_changed_field_and_only_listed_fields_are_resumable():
  old = run_record.flatten(tiny_config())
  config = tiny_config()
  config.optimizer.learning_rate = 1e-3
  config.eval.batch_size = 32
  config.model.image_shape = (8, 8, 2)
  assert run_record.diff(old, run_record.flatten(config)) == {
      "eval.batch_size": (16, 32), "model.image_shape": ([8, 8, 1], [8, 8, 2]),
      "optimizer.learning_rate": (old["optimizer.learning_rate"], 1e-3)}
  assert run_record.diff({"a.b": 1}, {"a.c": 1}) == {"a.b": (1, "<absent>"), "a.c": ("<absent>", 1)}
  resumable = ["training.num_steps", "training.log_every", "training.eval_every",
               "training.checkpoint_every", "training.keep_checkpoints", "eval.batch_size",
               "sample.sampler", "data.num_threads", "data.prefetch_batches"]
  assert all(run_record.is_resumable(name) for name in resumable)
  fixed = ["training.batch_size", "training.num_steps_extra", "optimizer.learning_rate",
           "optimizer.ema_decay", "data.dataset", "model.schedule", "seed", "evaluation.x"]
  assert not any(run_record.is_resumable(name) for name in fixed)


def test_first_start_records_the_config(five_steps):
  config, workdir = five_steps
  assert _recorded(workdir) == run_record.flatten(config)
  assert _recorded(workdir)["optimizer.learning_rate"] == config.optimizer.learning_rate
  assert not (workdir / run_record.CHANGES_FILE).exists()


def test_resume_with_a_changed_learning_rate_is_refused_naming_it_and_writes_nothing(
    five_steps, tmp_path):
  config, workdir = five_steps
  workdir = _copy(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  old_learning_rate = config.optimizer.learning_rate  # configs/digits.py's
  config.optimizer.learning_rate = 1e-3
  config.optimizer.ema_decay = 0.99
  config.training.num_steps = 8  # allowed: not named
  before = snapshot(workdir)
  with pytest.raises(train.ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message
  assert f"optimizer.learning_rate {old_learning_rate!r} -> 0.001" in message
  assert "optimizer.ema_decay 0.998 -> 0.99" in message
  assert "num_steps" not in message and "--allow_config_change" in message
  assert snapshot(workdir) == before


def test_num_steps_can_be_raised_freely_and_the_change_is_recorded(five_steps, tmp_path):
  config, workdir = five_steps
  workdir = _copy(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.training.num_steps = 7
  config.eval.num_examples = 16
  train.train_and_evaluate(config, str(workdir))
  assert "7" in os.listdir(workdir / "checkpoints")
  assert _recorded(workdir) == run_record.flatten(config)
  assert _changes(workdir) == [{"eval.num_examples": {"old": 24, "new": 16},
                                "training.num_steps": {"old": 5, "new": 7}}]


def _main(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  overrides = TINY_MODEL_FLAGS + [f"--config.{k}={v}" for k, v in (
      ("training.batch_size", 8), ("training.num_steps", 5), ("training.log_every", 5),
      ("training.checkpoint_every", 5), ("training.keep_checkpoints", 5),
      ("training.eval_every", 0), ("optimizer.warmup_steps", 2), ("eval.batch_size", 16),
      ("eval.num_examples", 24), ("sample.num_images", 4), ("sample.num_steps", 6),
      ("sample.gif_frames", 3), ("training.tensorboard", False), ("cpu_devices", 0))]
  return subprocess.run([sys.executable, "main.py", "--config=configs/digits.py",
                         f"--workdir={workdir}", *overrides, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_refuses_a_changed_learning_rate_and_resumes_with_allow_config_change(
    five_steps, tmp_path):
  config, workdir = five_steps
  workdir = _copy(workdir, tmp_path)
  old = config.optimizer.learning_rate  # configs/digits.py's
  refused = _main(workdir, "--config.optimizer.learning_rate=0.001")
  assert refused.returncode == 1, refused.stderr[-3000:]
  (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
  assert f"optimizer.learning_rate {old!r} -> 0.001" in line and "Traceback" not in refused.stderr
  allowed = _main(workdir, "--config.optimizer.learning_rate=0.001",
                  "--config.training.num_steps=7", "--allow_config_change")
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert f"optimizer.learning_rate {old!r} -> 0.001" in allowed.stderr  # logged
  assert "7" in os.listdir(workdir / "checkpoints")
  assert _recorded(workdir)["optimizer.learning_rate"] == 0.001
  assert _changes(workdir) == [{"optimizer.learning_rate": {"old": old, "new": 0.001},
                                "training.num_steps": {"old": 5, "new": 7}}]
