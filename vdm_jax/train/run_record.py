"""The config a workdir was trained with: recorded on the first start, compared on resume.

workdir/config.json holds the run's config. A resume compares the new config
with it field by field (dotted names): fields that change neither the data nor
the optimisation (how long to train, evaluation, sampling, logging and
checkpoint frequencies, the loader's threads) may change, and the change is
logged; any other change would resume silently into a different run, so it is
refused with a ConfigError naming each field with its old and new value,
unless allow_change is set (then it is logged too). Once the resume is under
way the file holds the new config, and workdir/config_changes.jsonl keeps one
line per resume that changed something. Only process 0 writes.
"""
import datetime
import json
import os
from typing import Any, Optional

from absl import logging
import jax
import ml_collections

from vdm_jax.train.errors import ConfigError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
# Fields (or sections, ending in ".") that a resume may change without --allow_config_change.
RESUMABLE = ("training.num_steps", "training.log_every", "training.eval_every",
             "training.checkpoint_every", "training.keep_checkpoints", "training.tensorboard",
             "eval.", "sample.",
             "data.num_threads", "data.prefetch_batches", "cpu_devices")
_ABSENT = "<absent>"


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"section.field": JSON value} of every leaf (tuples become lists, as JSON stores them)."""
  def walk(prefix, tree):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from walk(f"{prefix}{key}.", value)
      else:
        yield f"{prefix}{key}", value
  return json.loads(json.dumps(dict(walk("", config.to_dict())), default=repr))


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{field: (old value, new value)} of the fields that differ (missing: "<absent>")."""
  return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted({*old, *new})
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def is_resumable(field: str) -> bool:
  """True when a resume may change `field` freely (RESUMABLE)."""
  return any(field == r or (r.endswith(".") and field.startswith(r)) for r in RESUMABLE)


def _describe(changes):
  return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def compare(config: ml_collections.ConfigDict, workdir: str, *,
            allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
  """The changes of `config` against workdir/config.json, checked for a resume.

  Writes nothing (record() does, once the resume is under way).

  Args:
    config: this run's config.
    workdir: the folder of the run being resumed.
    allow_change: accept changes of fields outside RESUMABLE (they are logged).

  Returns:
    {field: (old, new)} of the fields that changed; empty when none changed or
    when the workdir has no record (then a warning is logged).

  Raises:
    ConfigError: a changed field outside RESUMABLE, unless allow_change.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  old = _read(path)
  if old is None:
    logging.warning("%s is missing: resuming without comparing the config", path)
    return {}
  changes = diff(old, flatten(config))
  refused = {k: v for k, v in changes.items() if not is_resumable(k)}
  if refused and not allow_change:
    raise ConfigError(f"the config differs from the one {workdir} was trained with "
                      f"({path}): {_describe(refused)}; resume with that config, use a fresh "
                      f"--workdir, or pass --allow_config_change to continue with the new values")
  if changes:
    logging.warning("resuming %s with a changed config: %s%s", workdir, _describe(changes),
                    " (allowed by --allow_config_change)" if refused else "")
  if "training.num_steps" in changes and config.optimizer.decay == "cosine":
    logging.warning("optimizer.decay is 'cosine': the learning rate now decays to 0 at "
                    "training.num_steps=%d", config.training.num_steps)
  return changes


def record(config: ml_collections.ConfigDict, workdir: str,
           changes: Optional[dict[str, tuple[Any, Any]]] = None) -> None:
  """Process 0 writes workdir/config.json (atomically, when it differs) and the changes.

  `changes` (from compare), when not empty, is appended as one JSON line with a
  UTC time stamp to workdir/config_changes.jsonl.
  """
  if jax.process_index() != 0:
    return
  path, flat = os.path.join(workdir, CONFIG_FILE), flatten(config)
  if _read(path) != flat:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(flat, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  if changes:
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
      f.write(json.dumps(line) + "\n")


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as err:
    raise ConfigError(f"{path} is not a readable config record ({err}); move it away to "
                      f"record this run's config instead") from None
