"""Orbax checkpoints of the training state plus the data-iterator position.

One checkpoint = step directory with two items: "state" (any pytree of arrays:
params, EMA params, optimizer state, step, RNG) and "data" (a small JSON dict,
the iterator position). Writes are atomic (orbax renames a finished temporary
directory), so a listed step is complete; a step that still fails to restore
(damaged files) makes `restore` fall back to the previous one with a warning.
A state holding NaN or Inf is never saved, and a checkpoint whose leaf shapes
differ from the expected state (another config) is refused, naming the leaf.

`WorkdirLock` keeps two trainers out of one workdir.
"""
import errno
import os
import socket
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def make_manager(directory, *, max_to_keep=3):
  """A CheckpointManager over `directory` (made absolute: orbax requires it).

  Args:
    directory: folder of the step directories; created if missing.
    max_to_keep: keep only the newest `max_to_keep` checkpoints (>= 1).

  Returns:
    ocp.CheckpointManager. Call `.close()` when done (it waits for saves).
  """
  if max_to_keep < 1:
    raise ValueError(f"keep_checkpoints must be >= 1, got {max_to_keep}")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_handlers=handlers)


def save(manager, step, state, data_state):
  """Saves `state` (pytree) and `data_state` (JSON dict) as checkpoint `step`.

  Orbax silently ignores a save of a step that already exists; this logs it
  instead and returns False. Returns True when a save was started (it may
  finish asynchronously; `manager.wait_until_finished()` waits for it).
  Raises ValueError, and writes nothing, when a leaf of `state` is not finite.
  """
  step = int(step)
  bad = first_nonfinite_leaf(state)
  if bad is not None:
    raise ValueError(f"refusing to save checkpoint {step}: the state has NaN/Inf in {bad}")
  if step in manager.all_steps():
    logging.info("checkpoint %d already exists in %s; not saving it again", step,
                 manager.directory)
    return False
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(dict(data_state)))
  return bool(manager.save(step, args=args, force=True))


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


@jax.jit
def _leaves_finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def first_nonfinite_leaf(tree):
  """Path ("a/b/c") of the first floating leaf of `tree` with a NaN or Inf, or None."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floats = [(p, x) for p, x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if not floats:
    return None
  finite = jax.device_get(_leaves_finite([x for _, x in floats]))
  for (path, _), ok in zip(floats, finite):
    if not ok:
      return _path_name(path)
  return None


def _check_shapes(manager, step, abstract_state):
  """Raises ValueError naming the first leaf whose saved shape differs from the expected one."""
  try:
    saved = manager.item_metadata(step)["state"]
  except Exception:  # pylint: disable=broad-except
    return  # unreadable metadata: the restore itself reports the damage
  if saved is None:
    return
  saved = dict(jax.tree_util.tree_leaves_with_path(saved, is_leaf=lambda x: hasattr(x, "shape")))
  saved = {_path_name(p): tuple(m.shape) for p, m in saved.items() if hasattr(m, "shape")}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    name = _path_name(path)
    if name not in saved:
      raise ValueError(f"checkpoint {step} in {manager.directory} was written by another config: "
                       f"it has no leaf {name}; use the config it was trained with or a fresh "
                       f"--workdir")
    if saved[name] != tuple(leaf.shape):
      raise ValueError(f"checkpoint {step} in {manager.directory} was written by another config: "
                       f"leaf {name} has shape {saved[name]} there but {tuple(leaf.shape)} in this "
                       f"config; use the config it was trained with or a fresh --workdir")


def _restore_step(manager, step, abstract_state):
  _check_shapes(manager, step, abstract_state)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore())
  restored = manager.restore(step, args=args)
  return restored["state"], dict(restored["data"])


def restore(manager, abstract_state, *, step: Optional[int] = None
           ) -> Optional[tuple[int, Any, dict]]:
  """Restores checkpoint `step`, or the newest one that loads.

  Args:
    manager: from make_manager.
    abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) or arrays
      giving the structure, dtypes and placement of the saved state.
    step: a named step (must exist and load), or None for the newest that
      loads; a damaged newest checkpoint is skipped with a warning.

  Returns:
    (step, state, data_state), or None when there is no checkpoint at all.
  """
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {manager.directory}; "
                       f"available steps: {sorted(steps)}")
    try:
      return (step, *_restore_step(manager, step, abstract_state))
    except ValueError as e:
      if "another config" in str(e):
        raise
      raise ValueError(f"checkpoint {step} in {manager.directory} does not load "
                       f"({_one_line(e)})") from None
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"checkpoint {step} in {manager.directory} does not load "
                       f"({_one_line(e)})") from None
  for candidate in steps:
    try:
      return (candidate, *_restore_step(manager, candidate, abstract_state))
    except ValueError as e:
      if "another config" in str(e):
        raise
      logging.warning("checkpoint %d in %s does not load (%s); falling back to the "
                      "previous one", candidate, manager.directory, _one_line(e))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %d in %s does not load (%s); falling back to the "
                      "previous one", candidate, manager.directory, _one_line(e))
  if steps:
    raise ValueError(f"none of the checkpoints {sorted(steps)} in {manager.directory} loads "
                     f"(damaged or not written by vdm_jax); move them away or use a fresh "
                     f"--workdir")
  return None


def _one_line(err):
  text = " ".join(str(err).split())
  return f"{type(err).__name__}: {text[:300]}"


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
  pid cannot be checked) makes `acquire` raise ValueError. `release` (or the
  end of a `with` block, also on exceptions) removes the file if it is still
  ours. Two processes taking over the same stale lock at the same instant is
  not guarded against.
  """

  def __init__(self, workdir):
    self.path = os.path.join(os.path.abspath(workdir), "LOCK")
    self._owner = f"{os.getpid()} {socket.gethostname()}"

  def _read_owner(self):
    try:
      with open(self.path) as f:
        pid, host = f.read().split()
      return int(pid), host
    except (OSError, ValueError):
      return None, None

  def acquire(self):
    """Creates the lock file; ValueError if another live trainer holds it."""
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
        raise ValueError(f"workdir {os.path.dirname(self.path)} is in use by another trainer "
                         f"(process {pid} on host {host}, lock file {self.path}); wait for it to "
                         f"finish or use another --workdir (delete the lock file only if that "
                         f"process is gone)") from None
      with os.fdopen(fd, "w") as f:
        f.write(self._owner + "\n")
      return self
    raise ValueError(f"could not create the lock file {self.path}; another trainer keeps taking it")

  def release(self):
    """Removes the lock file if this process holds it."""
    try:
      with open(self.path) as f:
        mine = f.read().strip() == self._owner
      if mine:
        os.remove(self.path)
    except OSError:
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def is_disk_full(err):
  """True when `err` (or an exception it was raised from) is OSError ENOSPC or EDQUOT."""
  while err is not None:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    err = err.__cause__ or err.__context__
  return False
