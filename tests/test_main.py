"""main.py end to end in subprocesses: train, eval and sample modes; one-line errors."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import decoders
from vdm_jax import sampling
from vdm_jax import train
from vdm_jax.train import inference
from train_helpers import TINY_MODEL_FLAGS
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# train_helpers.tiny_config's model and batches, so most programs come from the session's
# compilation cache (tests/conftest.py), compiled once for every test that builds them.
TINY = [*TINY_MODEL_FLAGS, "--config.training.batch_size=8",
        "--config.training.num_steps=3", "--config.training.log_every=1",
        "--config.training.checkpoint_every=2", "--config.optimizer.warmup_steps=2",
        "--config.eval.batch_size=16", "--config.eval.num_examples=16",
        "--config.sample.num_images=4", "--config.sample.num_steps=4",
        "--config.sample.gif_frames=2", "--config.training.tensorboard=False"]


def _main(*args, python_options=()):
  """main.py with --config=configs/digits.py, sharing the session's compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(
      [sys.executable, *python_options, "main.py", "--config=configs/digits.py", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _imported(stderr):
  """Names of the modules a `python -X importtime` process imported (its stderr table)."""
  return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.M))


def _printed_bpd(stdout):
  return float(re.search(r"'bpd': ([0-9.e+-]+)", stdout).group(1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = _main(f"--workdir={workdir}", *TINY, python_options=("-X", "importtime"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_train_mode_logs_progress_and_writes_checkpoints_and_samples(workdir):
  """(TensorBoard's event files: test_train's trained fixture; here the log only.)"""
  path, proc = workdir
  assert sorted(os.listdir(path / "checkpoints")) == ["2", "3"]
  assert os.listdir(path / "samples") and os.listdir(path / "plots")
  assert "train/bpd" in proc.stderr and "steps_per_sec" in proc.stderr and "ETA" in proc.stderr
  assert "per-pixel categorical baseline: 2.42" in proc.stderr
  assert "step 3 of 3 (100.0%), ETA 0:00:00" in proc.stderr
  assert "1, 2 devices: [CpuDevice(id=0), CpuDevice(id=1)]" in proc.stderr  # cpu_devices = 2


def test_training_without_tensorboard_never_imports_tensorflow_or_clus_writers(workdir):
  """TINY sets training.tensorboard=False: logs only, and TensorFlow's import (seconds and
  about 480 MB per process) never happens; the run still evaluates and samples."""
  path, proc = workdir
  imported = _imported(proc.stderr)
  assert {"jax", "vdm_jax.train.loop", "orbax.checkpoint"} <= imported  # the table is read
  assert not {"tensorflow", "clu.metric_writers"} & imported
  assert not [name for name in os.listdir(path) if name.startswith("events.out")]
  assert "test/bpd" in proc.stderr and os.listdir(path / "samples")


def test_eval_mode_reproduces_the_training_evaluation(workdir):
  path, train_proc = workdir
  proc = _main(f"--workdir={path}", "--mode=eval", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _printed_bpd(proc.stdout) == _printed_bpd(train_proc.stdout)


def test_readme_sample_command_draws_ode_samples_of_a_named_checkpoint(workdir):
  """The README's --mode=sample command (sampler=ode, 25 steps, GIF) on checkpoint 2: the
  images are DPM-Solver++(2M) samples of its EMA params from PRNGKey(sample.seed), decoded."""
  path, _ = workdir
  flags = [*TINY, "--config.sample.sampler=ode", "--config.sample.num_steps=25",
           "--config.sample.gif=True", "--config.sample.checkpoint_step=2"]
  proc = _main(f"--workdir={path}", "--mode=sample", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = os.listdir(path / "samples")
  for suffix in (".png", ".npy", "_reverse.gif"):
    assert f"step_00000002_ode25{suffix}" in names
  config = tiny_config()  # TINY's model
  setup = train.get_setup(config)
  _, state = inference.restore_for_inference(setup, str(path), 2)
  gamma_fn = setup.model.gamma_fn(state.ema_params)
  z_0 = sampling.ode_sample(setup.model.eps_fn(state.ema_params), gamma_fn,
                            jax.random.PRNGKey(config.sample.seed), (4, 8, 8, 1), num_steps=25)
  expected = decoders.decode(z_0, gamma_fn(jnp.zeros(4)), vocab_size=17)
  # argmax decoding may flip a pixel within float32 rounding of a bin edge (~1e-5 each).
  assert np.sum(np.load(path / "samples" / "step_00000002_ode25.npy") != expected) <= 1


@pytest.mark.parametrize("flag, message", [
    ("--config.training.nmu_steps=3", 'a --config override names a field the config does not '
     'have: nmu_steps Did you mean "num_steps"'),
    ("--config=configs/nope.py", "error: cannot load the --config file"),
    ("--config.data.dataset=cifar11", "error: unknown data.dataset 'cifar11'"),
    ("--config.training.num_steps=-1", "error: training.num_steps must be a positive integer"),
    ("--config.cpu_devices=-1", "error: cpu_devices must be an integer >= 0"),
])
def test_bad_input_exits_nonzero_with_one_line_error(tmp_path, flag, message):
  proc = _main(f"--workdir={tmp_path}", flag)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
