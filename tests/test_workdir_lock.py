"""One trainer per workdir: workdir/LOCK (pid + host, O_CREAT|O_EXCL), stale locks, release."""
import os
import pathlib
import socket
import subprocess
import sys
import threading

import pytest

from vdm_jax import train
from vdm_jax.train import lock as workdir_lock
from vdm_jax.train import loop
from train_helpers import snapshot
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from vdm_jax.train import lock as workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_trainer_on_a_locked_workdir_fails_naming_the_holder_and_changes_nothing(
    tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    (tmp_path / "keep.txt").write_text("earlier run")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
      train.train_and_evaluate(tiny_config(), str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert (f"workdir {tmp_path} is in use by another trainer (process {holder.pid} on host "
            f"{socket.gethostname()}") in message
    assert snapshot(tmp_path) == before
  finally:
    holder.kill()
    holder.wait()
  # SIGKILL left the lock behind: the next trainer of this host takes it over.
  assert (tmp_path / "LOCK").read_text().split() == [str(holder.pid), socket.gethostname()]
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / "LOCK").read_text().split() == [str(os.getpid()), socket.gethostname()]
  lock.release()
  assert not (tmp_path / "LOCK").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  (tmp_path / "LOCK").write_text(f"{pid} {socket.gethostname()}\n")
  with caplog.at_level("WARNING"):
    with workdir_lock.WorkdirLock(tmp_path):
      assert (tmp_path / "LOCK").read_text().split()[0] == str(os.getpid())
  assert f"taking over the stale lock {tmp_path / 'LOCK'} of process {pid}" in caplog.text
  assert not (tmp_path / "LOCK").exists()


def test_lock_of_another_host_is_respected_even_with_a_dead_pid(tmp_path):
  (tmp_path / "LOCK").write_text(f"{_dead_pid()} some-other-host\n")
  with pytest.raises(ValueError, match="in use by another trainer .* on host some-other-host"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / "LOCK").read_text().split()[1] == "some-other-host"


def test_exactly_one_of_many_simultaneous_acquirers_gets_the_lock(tmp_path):
  barrier, results = threading.Barrier(8), []

  def attempt():
    lock = workdir_lock.WorkdirLock(tmp_path)
    barrier.wait()
    try:
      lock.acquire()
      results.append("won")
    except ValueError:
      results.append("refused")
  threads = [threading.Thread(target=attempt) for _ in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sorted(results) == ["refused"] * 7 + ["won"]


def test_lock_is_released_when_training_raises(tmp_path, monkeypatch):
  def crash(setup, sources, workdir, *args, **kwargs):
    assert (pathlib.Path(workdir) / "LOCK").exists()
    raise train.TrainingError("simulated failure")
  monkeypatch.setattr(loop, "run", crash)
  with pytest.raises(train.TrainingError, match="simulated failure"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not (tmp_path / "LOCK").exists()


def test_release_leaves_a_lock_that_another_process_took(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  (tmp_path / "LOCK").write_text(f"1 {socket.gethostname()}\n")
  lock.release()
  assert (tmp_path / "LOCK").read_text().split()[0] == "1"
