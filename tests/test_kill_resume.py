"""Kill -9 at random moments (also mid-checkpoint), restart, and end bitwise where an uninterrupted run ends.

All runs are `python main.py` subprocesses of a tiny digits config sharing one
persistent compilation cache. Each restart must resume from the newest
finished checkpoint (never a half-written one), take over the stale workdir
lock, and the final state must equal the uninterrupted run's bit for bit.
A SIGTERM (preemption) unwinds cleanly: exit status 143, lock released.
"""
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from vdm_jax.train import checkpoints
from vdm_jax import train
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 36
FLAGS = ["--config=configs/digits.py", "--config.model.n_embd=32", "--config.model.n_layer=0",
         "--config.model.with_fourier_features=False", "--config.training.batch_size=8",
         f"--config.training.num_steps={NUM_STEPS}", "--config.training.log_every=1",
         "--config.training.checkpoint_every=3", "--config.training.keep_checkpoints=2",
         "--config.training.eval_every=0", "--config.optimizer.warmup_steps=2",
         "--config.eval.batch_size=16", "--config.eval.num_examples=16",
         "--config.sample.num_images=4", "--config.sample.num_steps=4"]
STEP_LINE = re.compile(r"\[(\d+)\] train/")


class _Run:
  """main.py in a subprocess; a thread collects its stderr lines."""

  def __init__(self, workdir, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    self.proc = subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *FLAGS],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr))
    self._reader.start()

  def last_step(self):
    steps = [int(m.group(1)) for line in list(self.lines) for m in [STEP_LINE.search(line)] if m]
    return max(steps, default=0)

  def saw(self, text):
    return any(text in line for line in list(self.lines))

  def wait(self):
    stdout = self.proc.stdout.read()
    self.proc.wait(timeout=300)
    self._reader.join()
    return self.proc.returncode, stdout, "".join(self.lines)


def _step_dirs(checkpoint_dir):
  names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _interrupt(run, checkpoint_dir, when, rng):
  """Waits for the moment `when` and sends SIGKILL (SIGTERM for "sigterm"). True if it hit."""
  start, leftovers = run.last_step(), set(_step_dirs(checkpoint_dir)[1])
  target = start + int(rng.integers(2, 6))
  while run.proc.poll() is None:
    if when == "tmp_folder":  # a checkpoint being written now
      hit = bool(set(_step_dirs(checkpoint_dir)[1]) - leftovers)
    elif when == "saving":
      hit = run.saw(f"saving checkpoint {3 * (start // 3 + 1)}")
    else:  # "step" and "sigterm": after a random train step
      hit = run.last_step() >= target
    if hit:
      run.proc.send_signal(signal.SIGTERM if when == "sigterm" else signal.SIGKILL)
      return True
    time.sleep(0.0005)
  return False


def _final_state(workdir):
  setup = train.get_setup(tiny_config())
  manager = checkpoints.make_manager(workdir / "checkpoints")
  step, state, position = checkpoints.restore(manager, setup.abstract_state())
  manager.close()
  return step, jax.tree.map(np.asarray, jax.device_get(state)), position


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bitwise_like_an_uninterrupted_run(
    tmp_path):
  rng = np.random.default_rng()
  cache = tmp_path / "jax_cache"
  reference = _Run(tmp_path / "reference", cache)
  code, ref_stdout, ref_stderr = reference.wait()
  assert code == 0, ref_stderr[-3000:]

  workdir = tmp_path / "killed"
  checkpoint_dir = workdir / "checkpoints"
  # SIGTERM mid-run, not last: a last resume can finish all steps before the signal lands.
  moments = ["step", "saving", "sigterm", "tmp_folder", "step", "saving"]
  half_written_seen, expected_resume = 0, None
  for i, when in enumerate(moments):
    started = time.monotonic()
    run = _Run(workdir, cache)
    assert _interrupt(run, checkpoint_dir, when, rng), f"run {i} ended before the {when} moment"
    code, _, stderr = run.wait()
    print(f"run {i}: {when} after {time.monotonic() - started:.1f} s at step {run.last_step()}")
    assert code == (143 if when == "sigterm" else -9), stderr[-3000:]
    finished, half_written = _step_dirs(checkpoint_dir)
    half_written_seen += bool(half_written)
    assert os.path.exists(workdir / "LOCK") == (when != "sigterm")
    if i > 0 and expected_resume is not None:  # resumed from the newest finished checkpoint
      assert f"resumed from checkpoint {expected_resume}" in stderr, stderr[-3000:]
    if i > 0:
      assert ("taking over the stale lock" in stderr) == (moments[i - 1] != "sigterm")
    assert "does not load" not in stderr
    expected_resume = max(finished, default=None)
  assert half_written_seen >= 1  # at least one kill left a half-written checkpoint behind

  last = _Run(workdir, cache)
  code, stdout, stderr = last.wait()
  assert code == 0, stderr[-3000:]
  assert f"resumed from checkpoint {expected_resume}" in stderr
  assert not os.path.exists(workdir / "LOCK")
  assert _step_dirs(checkpoint_dir)[1] == []  # orbax removed the half-written folders
  step, state, position = _final_state(workdir)
  ref_step, ref_state, ref_position = _final_state(tmp_path / "reference")
  assert step == ref_step == NUM_STEPS and position == ref_position
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert stdout.strip().splitlines()[-1] == ref_stdout.strip().splitlines()[-1]
