"""The training loop: train_and_evaluate(config, workdir).

The loop keeps the devices fed without running far ahead of them: the next batches
are placed on the devices while the current step runs (a small prefetch queue), at
most STEPS_IN_FLIGHT steps are queued at a time, and metrics, including the
non-finite flags, are read back only at log, evaluation and checkpoint boundaries.
Only process 0 writes metrics, images and plots; every process takes part in the
computation and in checkpointing.
"""
import collections
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import ml_collections

from vdm_jax.train import artifacts
from vdm_jax.train import checkpoints
from vdm_jax.train import config as config_lib
from vdm_jax.train import data
from vdm_jax.train import ema_snapshots
from vdm_jax.train import inference
from vdm_jax.train import lock
from vdm_jax.train import reporting
from vdm_jax.train import run_record
from vdm_jax.train import setup as setup_lib
from vdm_jax.train.errors import CheckpointError
from vdm_jax.train.errors import TrainingError

PREFETCH_DEPTH = 2
# Steps dispatched but not finished, at most. Without a bound the loop queues steps until
# XLA's CPU client blocks it (32 programs per device), and with several CPU devices
# (config.cpu_devices) that can deadlock: two digits runs with a DiT side by side on the
# 2-core machine stopped after 1 to 2 minutes in 4 of 4 tries, one device waiting in an
# all-reduce for the other, whose launch of the same program waited for a free slot of
# that 32-program limit (gdb, 2026-12-04); XLA then aborts ("Termination timeout for all
# reduce ... of 40 seconds exceeded"). Bounded at 1 and at 2 steps, such pairs ran through.
# Two steps keep one queued behind the running one, so the devices never wait for
# Python: 2,000 digits steps alone ran at 26 to 34 steps/s with and without it.
STEPS_IN_FLIGHT = 2
_STOP_REQUESTS: list[int] = []  # exit codes passed to request_stop, newest last


def request_stop(exit_code: int) -> None:
  """Asks the running training loop to raise SystemExit(exit_code) after its current step.

  For signal handlers (main.py's on SIGTERM): the handler raises SystemExit itself, but
  Python runs it between any two bytecodes of the main thread, and where that is inside
  code that ignores exceptions (a __del__ or weakref callback) the SystemExit is lost.
  The loop checks this request after every step, so training stops within one step
  either way; pending checkpoint writes then finish and the workdir lock is released.
  """
  _STOP_REQUESTS.append(exit_code)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_metrics: Optional[Callable[[int, dict], None]] = None,
                       allow_config_change: bool = False) -> dict:
  """Trains (resuming from workdir/checkpoints if any), evaluates, samples.

  Process 0 holds workdir/LOCK meanwhile: a second trainer on the same workdir
  fails with a ConfigError instead of interleaving checkpoints. The first start
  records the config in workdir/config.json; a resume with a changed config is
  refused (ConfigError naming each field) unless the change is one of
  run_record.RESUMABLE or allow_config_change is set.

  Args:
    config: the run's ConfigDict (configs/*.py, or default_config() with overrides).
    workdir: checkpoints, logs, samples and plots go here.
    on_metrics: optional callback(step, {name: float}) receiving what is logged: the
      train/* means every training.log_every steps and the test/* metrics of each
      evaluation (e.g. to plot learning curves in a notebook).
    allow_config_change: resume even when fields outside run_record.RESUMABLE changed
      (the change is logged and recorded).

  Returns:
    dict of the last evaluation's metrics (test bits/dim, EMA params).
  """
  config_lib.validate_config(config, workdir)
  sources = data.load_sources(config)
  setup = setup_lib.get_setup(config)
  if jax.process_index() != 0:  # the processes of one run share the workdir
    return run(setup, sources, workdir, on_metrics, config=config,
               allow_config_change=allow_config_change)
  with lock.WorkdirLock(workdir):
    return run(setup, sources, workdir, on_metrics, config=config,
               allow_config_change=allow_config_change)


def _prefetch_to_device(setup, iterator, depth):
  """Yields (global device batch, iterator state after it), `depth` batches ahead.

  grain's threads read the host batches ahead; placing batch i + depth on the
  devices is asynchronous, so it overlaps step i. The state recorded with each
  batch is the one to save after training on it (the iterator itself is ahead).
  """
  queue = collections.deque()
  while True:
    while len(queue) < depth:
      batch = setup.global_batch(next(iterator))
      queue.append((batch, iterator.get_state()))
    yield queue.popleft()


def wait_for_older_steps(in_flight: collections.deque, step_metrics: Any) -> None:
  """Bounds the steps queued on the devices: call after dispatching each train step.

  Appends the step's outputs (any pytree of device arrays, e.g. its metrics) to
  `in_flight` and, once more than STEPS_IN_FLIGHT are there, waits for the oldest to
  be computed. Loops that dispatch the train step back to back (this module's, the
  throughput benchmark's) use it to stay clear of the CPU deadlock described above.
  """
  in_flight.append(step_metrics)
  if len(in_flight) > STEPS_IN_FLIGHT:
    jax.block_until_ready(in_flight.popleft())


def _save(manager, step, state, data_state):
  """checkpoints.save, with a full disk turned into a TrainingError."""
  logging.info("saving checkpoint %d", step)
  try:
    checkpoints.save(manager, step, state, data_state)
  except Exception as err:  # pylint: disable=broad-except
    _raise_if_disk_full(err, manager)
    raise


class _Snapshots:
  """Writes the power-EMA snapshots (vdm_jax.train.ema_snapshots) of one run."""

  def __init__(self, config, workdir):
    o, t = config.optimizer, config.training
    self.sigma_rels, self.gammas = o.power_ema_sigma_rels, config_lib.power_ema_gammas(config)
    self.due = lambda done, last: ema_snapshots.is_due(
        done, every_updates=t.ema_snapshot_every, accumulation_steps=o.accumulation_steps,
        checkpoint_every=t.checkpoint_every, last=last)
    self.store = ema_snapshots.make_store(workdir) if self.sigma_rels else None

  def save(self, done, state):
    try:
      ema_snapshots.save(self.store, done, state, self.sigma_rels, self.gammas)
    except Exception as err:  # pylint: disable=broad-except
      _raise_if_disk_full(err, self.store)
      raise

  def wait(self):
    """Waits for pending snapshot writes (before a checkpoint, so it never gets ahead)."""
    if self.store is not None:
      try:
        self.store.wait_until_finished()
      except Exception as err:  # pylint: disable=broad-except
        _raise_if_disk_full(err, self.store)
        raise

  def close(self):
    if self.store is not None:
      self.store.close()


def _raise_if_disk_full(err, manager):
  if checkpoints.is_disk_full(err):
    raise TrainingError(f"no disk space left to write a checkpoint in {manager.directory} "
                        f"({err}); free disk space and resume: the previous checkpoints "
                        f"{sorted(manager.all_steps())} are kept") from None


def _restore_or_init(setup, manager, iterator):
  """(first step, state): from the newest loadable checkpoint, else a fresh state.

  The grain iterator is set to the position saved with the checkpoint, then
  starts reading in the background (while the train step compiles).
  """
  try:
    restored = checkpoints.restore(manager, setup.abstract_state())
  except BaseException:
    manager.close()
    raise
  if restored is None:
    return 0, setup.init_state()
  start, state, data_state = restored
  try:
    iterator.set_state(data_state)
  except (KeyError, TypeError, ValueError, IndexError) as err:
    manager.close()
    raise CheckpointError(f"checkpoint {start} in {manager.directory} holds the data position "
                          f"{data_state!r}, which this input pipeline cannot resume from "
                          f"({type(err).__name__}: {err}); use a fresh --workdir") from None
  logging.info("resumed from checkpoint %d (data position %s)", start, data_state)
  return start, state


def _start(setup, config, source, manager, workdir, allow_config_change):
  """(first step, state, train iterator at its position) of a fresh or resumed run.

  A resume first compares the config with the workdir's record (ConfigError on a
  refused change, before anything is read); the config is recorded once the
  checkpoint is restored. The iterator then reads ahead while the step compiles.
  """
  try:
    changes = (run_record.compare(config, workdir, allow_change=allow_config_change)
               if manager.all_steps() else {})
  except BaseException:
    manager.close()
    raise
  iterator = data.train_iterator(source, batch_size=config.training.batch_size,
                                 seed=config.seed, num_threads=config.data.num_threads,
                                 prefetch_batches=config.data.prefetch_batches)
  start, state = _restore_or_init(setup, manager, iterator)
  iterator.start_prefetch()
  run_record.record(config, workdir, changes)
  return start, state, iterator


def run(setup: setup_lib.Setup, sources: dict, workdir: str,
        on_metrics: Optional[Callable[[int, dict], None]] = None, *,
        config: Optional[ml_collections.ConfigDict] = None,
        allow_config_change: bool = False) -> dict:
  """Trains to config.training.num_steps, resuming from the newest loadable checkpoint.

  A step with a non-finite loss or gradient is skipped (see step.make_train_step);
  when training.max_nonfinite_steps of them in a row are read back (at the next
  log, evaluation or checkpoint boundary), a TrainingError stops the run without
  saving.

  `config` (default setup.config) supplies config.data; a resume compares it with
  the workdir's record first (run_record.compare), and once the state is restored
  it is recorded (run_record.record).

  Returns:
    dict: the last evaluation's test metrics (bits/dim of the EMA params).
  """
  config = setup.config if config is None else config
  t = config.training
  manager = checkpoints.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                     max_to_keep=t.keep_checkpoints)
  start, state, iterator = _start(setup, config, sources["train"], manager, workdir,
                                  allow_config_change)
  writer = reporting.make_writer(workdir, on_metrics, tensorboard=t.tensorboard)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  snapshots = _Snapshots(config, workdir)
  try:
    if start < t.num_steps:
      eval_metrics = _train(setup, sources, workdir, (start, state), iterator,
                            (manager, snapshots), writer)
    else:
      eval_metrics = setup.evaluate_params(state.ema_params, sources["test"])
    snapshots.wait()
    try:
      manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      _raise_if_disk_full(err, manager)
      raise
  finally:
    iterator.close()
    snapshots.close()
    manager.close()
    writer.flush()
  return eval_metrics


def _train(setup, sources, workdir, start_state, iterator, stores, writer):
  """The steps from start to training.num_steps, with their logs, evaluations and saves.

  stores: (checkpoint manager, _Snapshots). A snapshot due at a checkpoint step is written
  first, and pending snapshots are finished before each checkpoint: a checkpoint never
  gets ahead of the snapshots, so a resumed run writes every snapshot once.
  """
  t = setup.config.training
  start, state = start_state
  manager, snapshots = stores
  baseline = data.categorical_baseline(sources, setup.config.model.vocab_size)
  train_step, flops = setup.compiled_train_step()
  _STOP_REQUESTS.clear()  # a request of an earlier run in this process has been served
  metrics = reporting.Metrics(writer, reporting.NonfiniteCounter(t.max_nonfinite_steps), flops,
                              start=start, num_steps=t.num_steps)
  batches = _prefetch_to_device(setup, iterator, PREFETCH_DEPTH)
  history = artifacts.read_eval_history(workdir)  # wall time continues across resumes
  clock = time.perf_counter() - (history[-1]["elapsed_s"] or 0.0 if history else 0.0)
  eval_metrics = {}
  in_flight = collections.deque()
  for step in range(start, t.num_steps):
    batch, data_state = next(batches)
    state, step_metrics = train_step(state, batch)
    wait_for_older_steps(in_flight, step_metrics)
    done = step + 1
    metrics.add(done, step_metrics)
    last = done == t.num_steps
    evaluate = (t.eval_every and done % t.eval_every == 0) or last
    save = done % t.checkpoint_every == 0 or last
    snapshot = snapshots.store is not None and snapshots.due(done, last)
    if done % t.log_every == 0 or last:
      metrics.write(done)
    if evaluate or save or snapshot:
      metrics.check_nonfinite()
    if evaluate:
      eval_metrics = inference.evaluate_and_draw(setup, state, sources["test"], done, workdir,
                                                 writer, baseline, time.perf_counter() - clock)
    if snapshot:
      snapshots.save(done, state)
    if save:
      snapshots.wait()
      _save(manager, done, state, data_state)
    if evaluate or save or snapshot:
      metrics.restart_clock(done)
    if _STOP_REQUESTS:
      raise SystemExit(_STOP_REQUESTS.pop())
  return eval_metrics
