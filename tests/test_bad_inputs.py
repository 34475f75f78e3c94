"""Bad inputs: each fails with a one-line error naming the problem and leaves the workdir as it was.

Every case starts from a copy of a workdir holding a real checkpoint (step 5
of the tiny digits config) and a file of an earlier run; the listing and the
sha256 of every file must be the same after the failure. A few cases go
through `python main.py` (exit status and stderr).
"""
import errno
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from vdm_jax.train import checkpoints
from vdm_jax.train import data
from vdm_jax import train
from vdm_jax.train import inference
from train_helpers import snapshot
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A workdir with checkpoint 5 (the initial state of tiny_config) and a note."""
  workdir = tmp_path_factory.mktemp("pristine")
  setup = train.get_setup(tiny_config())
  manager = checkpoints.make_manager(workdir / "checkpoints")
  checkpoints.save(manager, 5, setup.init_state(), {"next_index": 5})  # grain: 5 batches taken
  manager.close()
  (workdir / "notes.txt").write_text("an earlier run")
  return workdir


def _set(field, value):
  def prepare(config, workdir, monkeypatch):
    config.update_from_flattened_dict({field: value})
    return train.train_and_evaluate
  return prepare


def _npz(expected_problem, **arrays):
  """Writes arrays to workdir/../data.npz and points data.path at it (dataset npz)."""
  def prepare(config, workdir, monkeypatch):
    path = workdir.parent / f"{expected_problem}.npz"
    np.savez(path, **arrays)
    config.data.dataset, config.data.path = "npz", str(path)
    return train.train_and_evaluate
  return prepare


def _images(shape=(20, 8, 8, 1), dtype=np.int32, low=0, high=17):
  return np.random.default_rng(1651).integers(low, high, shape).astype(dtype)


def _npz_bytes(content):
  def prepare(config, workdir, monkeypatch):
    path = workdir.parent / "broken.npz"
    path.write_bytes(content)
    config.data.dataset, config.data.path = "npz", str(path)
    return train.train_and_evaluate
  return prepare


def _devices(count):
  def prepare(config, workdir, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: count)
    return train.train_and_evaluate
  return prepare


def _split(config, workdir, monkeypatch):
  return lambda config, workdir: data.load_source("digits", "validation")


def _damage_files(how):
  def prepare(config, workdir, monkeypatch):
    for root, _, files in os.walk(workdir / "checkpoints" / "5"):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          content = f.read()
        with open(path, "wb") as f:
          f.write({"garbage": b"garbage", "truncated": content[:len(content) // 2]}[how])
    return train.evaluate
  return prepare


def _foreign(config, workdir, monkeypatch):
  shutil.rmtree(workdir / "checkpoints" / "5")
  (workdir / "checkpoints" / "5").mkdir()
  (workdir / "checkpoints" / "5" / "model.pt").write_bytes(os.urandom(64))
  return train.evaluate


def _no_checkpoint(config, workdir, monkeypatch):
  shutil.rmtree(workdir / "checkpoints")
  return train.evaluate


def _named_step(config, workdir, monkeypatch):
  config.eval.checkpoint_step = 9  # --mode=eval reads eval.checkpoint_step
  return train.evaluate


def _other_config(mode):
  def prepare(config, workdir, monkeypatch):
    config.model.n_embd = 64
    return {"train": train.train_and_evaluate, "eval": train.evaluate}[mode]
  return prepare


def _unwritable(config, workdir, monkeypatch):
  return lambda config, workdir: train.train_and_evaluate(config, os.path.join(workdir, "notes.txt"))


def _unprepared_tfds(config, workdir, monkeypatch):
  config.data.dataset, config.data.data_dir = "mnist", str(workdir.parent / "no_tfds")
  return train.train_and_evaluate


CASES = [
    ("num_steps_zero", _set("training.num_steps", 0),
     "training.num_steps must be a positive integer, got 0"),
    ("num_steps_none", _set("training.num_steps", None),
     "training.num_steps must be a positive integer, got None"),
    ("batch_negative", _set("training.batch_size", -8),
     "training.batch_size must be a positive integer, got -8"),
    ("log_every_zero", _set("training.log_every", 0), "training.log_every must be a positive"),
    ("checkpoint_every_zero", _set("training.checkpoint_every", 0),
     "training.checkpoint_every must be a positive"),
    ("keep_zero", _set("training.keep_checkpoints", 0), "training.keep_checkpoints must be a"),
    ("eval_every_negative", _set("training.eval_every", -1),
     "training.eval_every must be an integer >= 0"),
    ("max_nonfinite_zero", _set("training.max_nonfinite_steps", 0),
     "training.max_nonfinite_steps must be a positive integer, got 0"),
    ("eval_batch_zero", _set("eval.batch_size", 0), "eval.batch_size must be a positive"),
    ("eval_time_samples_zero", _set("eval.num_time_samples", 0),
     "eval.num_time_samples must be a positive"),
    ("eval_examples_negative", _set("eval.num_examples", -1),
     "eval.num_examples must be an integer >= 0"),
    ("tensorboard_none", _set("training.tensorboard", None),
     "training.tensorboard must be True or False, got None"),
    ("sample_steps_zero", _set("sample.num_steps", 0), "sample.num_steps must be a positive"),
    ("sampler_unknown", _set("sample.sampler", "euler"), "sample.sampler must be one of"),
    ("lr_zero", _set("optimizer.learning_rate", 0.0), "optimizer.learning_rate must be > 0"),
    ("ema_one", _set("optimizer.ema_decay", 1.0), "optimizer.ema_decay must be in [0, 1), got 1"),
    ("b1_none", _set("optimizer.b1", None), "optimizer.b1 must be a number, got None"),
    ("decay_unknown", _set("optimizer.decay", "exponential"),
     "optimizer.decay must be 'constant', 'cosine' or 'linear'"),
    ("accumulation_zero", _set("optimizer.accumulation_steps", 0),
     "optimizer.accumulation_steps must be an integer >= 1"),
    ("vocab_one", _set("model.vocab_size", 1), "ModelConfig.vocab_size"),
    ("network_unknown", _set("model.network", "resnet"), "ModelConfig.network"),
    ("width_not_groupable", _set("model.n_embd", 30), "ModelConfig.n_embd: expected a multiple"),
    ("dataset_unknown", _set("data.dataset", "cifar11"), "unknown data.dataset 'cifar11'"),
    ("batch_vs_3_devices", _devices(3), "training.batch_size=8 is not divisible by the 3 devices"),
    ("split_unknown", _split, "split must be 'train' or 'test', got 'validation'"),
    ("npz_3d", _npz("npz_3d", image=_images((20, 8, 8))),
     "image must be an integer [N,H,W,C] array, got int32 (20, 8, 8)"),
    ("npz_float", _npz("npz_float", image=_images(dtype=np.float32)),
     "image must be an integer [N,H,W,C] array, got float32"),
    ("npz_above_vocab", _npz("npz_above_vocab", image=_images(low=10, high=256)),
     "model.vocab_size=17 needs them in [0, 16]"),
    ("npz_negative", _npz("npz_negative", image=_images(low=-3, high=5)),
     "needs them in [0, 16]"),
    ("npz_wrong_shape", _npz("npz_wrong_shape", image=_images((20, 16, 16, 1))),
     "have shape (16, 16, 1) but model.image_shape is (8, 8, 1)"),
    ("npz_no_image", _npz("npz_no_image", pixels=_images()), "must contain an 'image' array"),
    ("npz_garbage", _npz_bytes(b"not a zip archive"), "is not a readable .npz file"),
    ("tfds_unprepared", _unprepared_tfds, "is not prepared as array_record in data_dir"),
    ("checkpoint_garbage", _damage_files("garbage"), "none of the checkpoints [5]"),
    ("checkpoint_truncated", _damage_files("truncated"), "none of the checkpoints [5]"),
    ("checkpoint_foreign", _foreign, "none of the checkpoints [5]"),
    ("checkpoint_missing", _no_checkpoint, "train first with --mode=train"),
    ("checkpoint_step_missing", _named_step, "no checkpoint for step 9"),
    ("checkpoint_other_config_eval", _other_config("eval"),
     "was written by another config: leaf params/"),
    ("checkpoint_other_config_resume", _other_config("train"),
     "was written by another config: leaf params/"),
    ("workdir_is_a_file", _unwritable, "is not writable"),
]


@pytest.mark.parametrize("prepare, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_error_and_leaves_the_workdir_unchanged(
    pristine, tmp_path, monkeypatch, prepare, expected):
  workdir = tmp_path / "workdir"
  shutil.copytree(pristine, workdir)
  config = tiny_config()
  call = prepare(config, workdir, monkeypatch)
  before = snapshot(workdir)
  with pytest.raises(ValueError) as info:
    call(config, str(workdir))
  assert expected in str(info.value)
  assert "\n" not in str(info.value)
  assert snapshot(workdir) == before


def test_labels_out_of_range_for_a_conditional_model_are_rejected(tmp_path):
  path = tmp_path / "labelled.npz"
  np.savez(path, image=_images(), label=np.arange(20))
  config = tiny_config()
  config.model.num_classes = 10
  config.data.dataset, config.data.path = "npz", str(path)
  with pytest.raises(ValueError, match=r"labels lie in \[0, 1\d\] but model.num_classes=10 needs them in \[0, 9\]"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_full_disk_at_a_checkpoint_names_disk_space_and_keeps_the_previous_checkpoint(
    pristine, tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  shutil.copytree(pristine, workdir)
  kept = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints")}

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", no_space)
  # Steps that only count (no compile): the subject is the save.
  count_only = lambda state, batch: (state.replace(step=state.step + 1),
                                     {"nonfinite": jax.numpy.zeros(())})
  monkeypatch.setattr(train.Setup, "compiled_train_step", lambda self: (count_only, None))
  monkeypatch.setattr(inference, "evaluate_and_draw", lambda *args: {})
  with pytest.raises(train.TrainingError) as info:
    train.train_and_evaluate(tiny_config(num_steps=7), str(workdir))
  message = str(info.value)
  assert "\n" not in message and "no disk space left" in message
  assert "the previous checkpoints [5] are kept" in message
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == kept
  assert "LOCK" not in after


class _NoSpaceFuture:
  """A commit future of an asynchronous checkpoint write that fails as on a full disk."""

  def result(self, timeout=None):
    del timeout
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_an_asynchronous_checkpoint_write_names_disk_space_and_keeps_the_previous(
    pristine, tmp_path, monkeypatch):
  """The write starts, training goes on, and the ENOSPC surfaces later, from orbax's
  background commit, at manager.wait_until_finished: it must still read as a full disk."""
  workdir = tmp_path / "workdir"
  shutil.copytree(pristine, workdir)
  kept = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints/5")}
  original = checkpoints.ocp.StandardCheckpointHandler.async_save

  async def async_save_then_fail(self, *args, **kwargs):
    return list(await original(self, *args, **kwargs) or []) + [_NoSpaceFuture()]
  monkeypatch.setattr(checkpoints.ocp.StandardCheckpointHandler, "async_save",
                      async_save_then_fail)
  count_only = lambda state, batch: (state.replace(step=state.step + 1),
                                     {"nonfinite": jax.numpy.zeros(())})
  monkeypatch.setattr(train.Setup, "compiled_train_step", lambda self: (count_only, None))
  monkeypatch.setattr(inference, "evaluate_and_draw", lambda *args: {})
  with pytest.raises(train.TrainingError) as info:
    train.train_and_evaluate(tiny_config(num_steps=7), str(workdir))  # saves 7 (the last)
  message = str(info.value)
  assert "\n" not in message and "no disk space left" in message
  assert "the previous checkpoints [5] are kept" in message
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k.startswith("checkpoints/5")} == kept
  assert checkpoints.make_manager(workdir / "checkpoints").all_steps() == [5]
  assert "LOCK" not in after


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "main.py", "--config=configs/digits.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flags, message", [
    (["--config.training.num_steps=ten"], "error: bad flag"),
    (["--config.training.batch_size=8", "--config.model.n_embd=32", "--mode=eval"],
     "none of the checkpoints [5]"),
    (["--config.data.dataset=mnist", "--config.data.data_dir={tmp}/no_tfds"],
     "is not prepared as array_record in data_dir {tmp}/no_tfds"),
], ids=["mistyped_override", "eval_corrupt_checkpoint", "unprepared_tfds"])
def test_main_exits_nonzero_with_one_error_line_and_no_traceback(pristine, tmp_path, flags,
                                                                  message):
  workdir = tmp_path / "workdir"
  shutil.copytree(pristine, workdir)
  _damage_files("garbage")(None, workdir, None)
  before = snapshot(workdir)
  flags = [f.format(tmp=tmp_path) for f in flags]
  # 30 s: an unprepared dataset must fail at once, not try to download it.
  proc = _main(f"--workdir={workdir}", *flags, timeout=30)
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert any(message.format(tmp=tmp_path) in line for line in errors), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert snapshot(workdir) == before
