"""Orbax checkpoints of the training state plus the data-iterator position.

One checkpoint = step directory with two items: "state" (any pytree of arrays:
params, EMA params, optimizer state, step, RNG) and "data" (a small JSON dict,
the iterator position). Writes are atomic (orbax renames a finished temporary
directory), so a listed step is complete; a step that still fails to restore
(damaged files) makes `restore` fall back to the previous one with a warning.
"""
import os
from typing import Any, Optional

from absl import logging
import orbax.checkpoint as ocp

_ITEMS = ("state", "data")


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
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=_ITEMS)


def save(manager, step, state, data_state):
  """Saves `state` (pytree) and `data_state` (JSON dict) as checkpoint `step`.

  Orbax silently ignores a save of a step that already exists; this logs it
  instead and returns False. Returns True when a save was started (it may
  finish asynchronously; `manager.wait_until_finished()` waits for it).
  """
  step = int(step)
  if step in manager.all_steps():
    logging.info("checkpoint %d already exists in %s; not saving it again", step,
                 manager.directory)
    return False
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(dict(data_state)))
  return bool(manager.save(step, args=args, force=True))


def _restore_step(manager, step, abstract_state):
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
    return (step, *_restore_step(manager, step, abstract_state))
  for candidate in steps:
    try:
      return (candidate, *_restore_step(manager, candidate, abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %d in %s does not load (%s: %s); falling back to the "
                      "previous one", candidate, manager.directory, type(e).__name__, e)
  if steps:
    logging.warning("no checkpoint in %s loads; starting from scratch", manager.directory)
  return None
