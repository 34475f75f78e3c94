"""Kill -9 at random moments (also mid-checkpoint), restart, and end bitwise where an uninterrupted run ends.

The interrupted runs are `python main.py` subprocesses of a tiny digits config; the
uninterrupted reference trains the same config in the test's process first (saving only
at its end), so the subprocesses load every program from the session's compilation
cache. Each kill moment is drawn inside the run's own training, after the step it
resumed from: a random train step, the moment a given checkpoint is announced ("saving
checkpoint k", matched exactly), or while a checkpoint folder is still being written.
Each restart must resume from the newest finished checkpoint (never a half-written one)
and take over the stale workdir lock, and the final state must equal the uninterrupted
run's bit for bit. A SIGTERM (preemption), sent after a checkpoint was started, unwinds
cleanly: exit status 143, lock released, that checkpoint finished (so later restarts
resume from it). The draws' seed is printed (and can be set with KILL_RESUME_SEED) so a
failure can be replayed.
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

from configs import digits
from vdm_jax.train import checkpoints
from vdm_jax import train
from train_helpers import TINY_MODEL
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS, EVERY = 40, 3
OVERRIDES = {**{f"model.{name}": value for name, value in TINY_MODEL.items()},
             "training.batch_size": 8, "training.num_steps": NUM_STEPS, "training.log_every": 1,
             "training.checkpoint_every": EVERY, "training.keep_checkpoints": 2,
             "training.eval_every": 0, "optimizer.warmup_steps": 2, "eval.batch_size": 16,
             "eval.num_examples": 16, "sample.num_images": 4, "sample.num_steps": 4,
             "sample.gif_frames": 2, "data.num_threads": 0, "training.tensorboard": False,
             # One CPU device, as this process has: the comparison is bitwise, and the
             # device count changes float rounding (configs/digits.py asks for 2).
             "cpu_devices": 0}
FLAGS = ["--config=configs/digits.py", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
STEP_LINE = re.compile(r"\[(\d+)\] train/")
SAVING_LINE = re.compile(r"saving checkpoint (\d+)$")


class _Run:
  """main.py in a subprocess; a thread reads its stderr and fires `trigger` on each line."""

  def __init__(self, workdir, trigger=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    self.proc = subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *FLAGS],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.lines, self.signalled, self._trigger = [], None, trigger
    self._reader = threading.Thread(target=self._read)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append(line)
      if self.signalled is None and self._trigger is not None:
        sig = self._trigger(line.rstrip())
        if sig is not None:
          self.send(sig)

  def send(self, sig):
    if self.signalled is None and self.proc.poll() is None:
      self.signalled = sig
      self.proc.send_signal(sig)

  def last_step(self):
    return max((int(m.group(1)) for line in self.lines for m in [STEP_LINE.search(line)] if m),
               default=0)

  def wait(self):
    stdout = self.proc.stdout.read()
    self.proc.wait(timeout=300)
    self._reader.join()
    return self.proc.returncode, stdout, "".join(self.lines)


def _step_dirs(checkpoint_dir):
  """(finished steps, names of half-written temporary folders)."""
  names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _after_step(target, sig):
  """Trigger: `sig` once the run logs train step `target` or later."""
  def trigger(line):
    m = STEP_LINE.search(line)
    return sig if m and int(m.group(1)) >= target else None
  return trigger


def _on_saving(step):
  """Trigger: SIGKILL when the run announces exactly checkpoint `step` (not 30 for 3)."""
  def trigger(line):
    m = SAVING_LINE.search(line)
    return signal.SIGKILL if m and int(m.group(1)) == step else None
  return trigger


def _identity(path):
  """(inode, change time) of path, or None: tells a recreated folder from the old one."""
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    return None
  return stat.st_ino, stat.st_ctime_ns


def _kill_while_writing(run, checkpoint_dir, min_step, stale):
  """SIGKILL as soon as this run's temporary folder of a checkpoint >= min_step appears.

  stale: {name: identity} of the temporary folders a killed run left behind; a folder of
  the same name counts only once it has been recreated (another inode or change time).
  """
  while run.proc.poll() is None and run.signalled is None:
    for name in _step_dirs(checkpoint_dir)[1]:
      digits = re.match(r"\d+", name)
      path = os.path.join(checkpoint_dir, name)
      if (digits and int(digits.group()) >= min_step
          and (name not in stale or _identity(path) not in (None, stale[name]))):
        run.send(signal.SIGKILL)
    time.sleep(0.001)


def _interrupted_run(workdir, when, resume, rng):
  """Starts a run that resumes from `resume` and interrupts it at a moment drawn after it."""
  checkpoint_dir = workdir / "checkpoints"
  if when in ("step", "sigterm"):
    target = resume + int(rng.integers(1, 2 * EVERY + 1))
    if when == "sigterm":  # after the next checkpoint was started ("[c+1]" follows "saving c")
      target = max(target, (resume // EVERY + 1) * EVERY + 1)
    sig = signal.SIGTERM if when == "sigterm" else signal.SIGKILL
    return _Run(workdir, _after_step(target, sig)), f"{when} at step {target}"
  checkpoint = (resume // EVERY + int(rng.integers(1, 3))) * EVERY
  if when == "saving":
    return _Run(workdir, _on_saving(checkpoint)), f"saving checkpoint {checkpoint}"
  stale = {name: _identity(os.path.join(checkpoint_dir, name))
           for name in _step_dirs(checkpoint_dir)[1]}
  run = _Run(workdir)
  threading.Thread(target=_kill_while_writing,
                   args=(run, checkpoint_dir, checkpoint, stale)).start()
  return run, f"writing checkpoint >= {checkpoint}"


def _uninterrupted_run(workdir):
  """The reference: the same config trained in this process, without interruption; returns
  the line main.py prints last (main.py adds only the flag parsing around this call)."""
  config = digits.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  # One checkpoint, at the end, instead of every EVERY steps: saving does not change training
  # (the killed runs' end must equal this run's all the same), and it saves about 12 writes.
  config.training.checkpoint_every = NUM_STEPS
  return f"train: {train.train_and_evaluate(config, str(workdir))}"


def _final_state(workdir):
  setup = train.get_setup(tiny_config())
  manager = checkpoints.make_manager(workdir / "checkpoints")
  step, state, position = checkpoints.restore(manager, setup.abstract_state())
  manager.close()
  return step, jax.tree.map(np.asarray, jax.device_get(state)), position


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bitwise_like_an_uninterrupted_run(
    tmp_path):
  seed = int(os.environ.get("KILL_RESUME_SEED", np.random.SeedSequence().entropy % 2**32))
  print(f"kill moments drawn with KILL_RESUME_SEED={seed}")
  rng = np.random.default_rng(seed)
  ref_printed = _uninterrupted_run(tmp_path / "reference")

  workdir = tmp_path / "killed"
  checkpoint_dir = workdir / "checkpoints"
  # A checkpoint write is caught half-written by the "writing" kill, retried (at most twice
  # more) until one is; SIGTERM mid-run, never last (a last run could finish first).
  moments, retries, resume, previous = ["step", "writing", "sigterm", "saving"], 2, 0, None
  half_written_seen = 0
  while moments:
    when = moments.pop(0)
    run, moment = _interrupted_run(workdir, when, resume, rng)
    code, _, stderr = run.wait()
    finished, half_written = _step_dirs(checkpoint_dir)
    print(f"{moment} (resumed from {resume}): stopped at step {run.last_step()}, "
          f"checkpoints {finished}, half-written {half_written}")
    assert run.signalled is not None, f"the run ended before the moment: {moment}"
    assert code == (143 if run.signalled == signal.SIGTERM else -9), stderr[-3000:]
    assert os.path.exists(workdir / "LOCK") == (run.signalled != signal.SIGTERM)
    if resume:  # resumed from the newest finished checkpoint, never a half-written one
      assert f"resumed from checkpoint {resume}" in stderr, stderr[-3000:]
    if previous is not None:
      assert ("taking over the stale lock" in stderr) == (previous != signal.SIGTERM)
    assert "does not load" not in stderr
    if when == "sigterm":  # a preemption finishes the checkpoints it started: none is lost
      assert max(finished, default=0) >= (run.last_step() - 1) // EVERY * EVERY, stderr[-3000:]
    half_written_seen += bool(half_written)
    if when == "writing" and not half_written and retries:
      moments.insert(0, "writing")
      retries -= 1
    resume, previous = max(finished, default=0), run.signalled
  assert half_written_seen >= 1  # a kill left a half-written checkpoint behind

  last = _Run(workdir)
  code, stdout, stderr = last.wait()
  assert code == 0, stderr[-3000:]
  if resume:  # (every kill may have come before the first checkpoint was finished)
    assert f"resumed from checkpoint {resume}" in stderr
  assert not os.path.exists(workdir / "LOCK")
  assert _step_dirs(checkpoint_dir)[1] == []  # orbax removed the half-written folders
  step, state, position = _final_state(workdir)
  ref_step, ref_state, ref_position = _final_state(tmp_path / "reference")
  assert step == ref_step == NUM_STEPS and position == ref_position
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert stdout.strip().splitlines()[-1] == ref_printed
