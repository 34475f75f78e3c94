"""Exclusive use of a workdir by one trainer: the file `workdir/LOCK` holding "pid host"."""
import os
import socket
from typing import Any

from absl import logging

from vdm_jax.train.errors import ConfigError


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Exclusive use of a workdir by one trainer: the file `workdir/LOCK` holding "pid host".

  Created atomically (O_CREAT | O_EXCL). A lock left by a dead process of this
  host is taken over with a warning; a live one (or one of another host, whose
  pid cannot be checked) makes `acquire` raise ConfigError. `release` (or the
  end of a `with` block, also on exceptions) removes the file if it is still
  ours. Two processes taking over the same stale lock at the same instant is
  not guarded against.
  """

  def __init__(self, workdir: str) -> None:
    """The lock of workdir (its file workdir/LOCK); nothing is created until `acquire`."""
    self.path = os.path.join(os.path.abspath(workdir), "LOCK")
    self._owner = f"{os.getpid()} {socket.gethostname()}"

  def _read_owner(self):
    try:
      with open(self.path) as f:
        pid, host = f.read().split()
      return int(pid), host
    except (OSError, ValueError):
      return None, None

  def acquire(self) -> "WorkdirLock":
    """Creates the lock file; ConfigError if another live trainer holds it."""
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        pid, host = self._read_owner()
        if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
          logging.warning("taking over the stale lock %s of process %d (no longer running)",
                          self.path, pid)
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by another trainer "
                         f"(process {pid} on host {host}, lock file {self.path}); wait for it to "
                         f"finish or use another --workdir (delete the lock file only if that "
                         f"process is gone)") from None
      with os.fdopen(fd, "w") as f:
        f.write(self._owner + "\n")
      return self
    raise ConfigError(f"could not create the lock file {self.path}; another trainer keeps taking it")

  def release(self) -> None:
    """Removes the lock file if this process holds it."""
    try:
      with open(self.path) as f:
        mine = f.read().strip() == self._owner
      if mine:
        os.remove(self.path)
    except OSError:
      pass

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()
