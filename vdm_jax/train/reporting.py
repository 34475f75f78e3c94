"""What the trainer reports: metric writers, per-step metrics with progress, skipped steps.

make_writer gives the run's writer: clu's default writer (log lines plus TensorBoard
event files) when training.tensorboard is set, else log lines only. clu's writers import
TensorFlow: 4.5 s and about 480 MB more per training process on a 2-core CPU
(2026-12-01), which the log-only writer does not pay. Either way the writer has the
methods the trainer calls: write_scalars, write_images, write_hparams, flush, close.
"""
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.train import performance
from vdm_jax.train.errors import TrainingError


class LogWriter:
  """Writes to the log only, in the format of clu's LoggingWriter ("[step] name=value, ...")."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    """Logs "[step] name=value, ..." with the names sorted and values to 6 digits."""
    text = ", ".join(f"{name}={float(value):.6g}" for name, value in sorted(scalars.items()))
    logging.info("[%d] %s", step, text)

  def write_images(self, step: int, images: dict) -> None:
    """Logs the shape of each image batch ({name: [N, H, W, C] array})."""
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams: dict) -> None:
    """Logs the hyperparameters ({name: value})."""
    logging.info("[Hyperparameters] %s", hparams)

  def flush(self) -> None:
    """Nothing to flush: each line is logged as it is written."""

  def close(self) -> None:
    """Nothing to close."""


class CallbackWriter:
  """Scalars go to callback(step, {name: float}); everything else is dropped."""

  def __init__(self, callback: Callable[[int, dict], None]) -> None:
    """callback(step, {name: float}) receives every write_scalars call."""
    self._callback = callback

  def write_scalars(self, step: int, scalars: dict) -> None:
    """callback(step, scalars as floats)."""
    self._callback(int(step), {k: float(v) for k, v in scalars.items()})

  def write_images(self, step: int, images: dict) -> None:
    """Drops the images."""
    del step, images

  def write_hparams(self, hparams: dict) -> None:
    """Drops the hyperparameters."""
    del hparams

  def flush(self) -> None:
    """Nothing to flush: each call reaches the callback at once."""

  def close(self) -> None:
    """Nothing to close."""


class _Writers:
  """Several writers as one: each call goes to every writer, in order."""

  def __init__(self, writers: list):
    self._writers = writers

  def write_scalars(self, step: int, scalars: dict) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step: int, images: dict) -> None:
    for writer in self._writers:
      writer.write_images(step, images)

  def write_hparams(self, hparams: dict) -> None:
    for writer in self._writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def make_writer(workdir: str, on_metrics: Optional[Callable[[int, dict], None]] = None, *,
                tensorboard: bool = True) -> Any:
  """The run's metric writer: log lines, TensorBoard events in `workdir` (process 0, when
  `tensorboard`), and the scalars passed to on_metrics(step, {name: float}) if given."""
  if tensorboard and jax.process_index() == 0:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writers = [metric_writers.create_default_writer(workdir)]
  else:
    writers = [LogWriter()]
  if on_metrics is not None:
    writers.append(CallbackWriter(on_metrics))
  return _Writers(writers)


class NonfiniteCounter:
  """Counts consecutive skipped (NaN/Inf) steps from their flags, read back in order."""

  def __init__(self, limit: int) -> None:
    """limit: training.max_nonfinite_steps, the skipped steps in a row that stop training."""
    self.limit, self.consecutive, self.total = limit, 0, 0

  def observe(self, step: int, flag: float) -> None:
    """Takes step `step`'s flag (1.0: skipped); raises TrainingError at `limit` in a row."""
    if flag == 0.0:
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    logging.warning("step %d: non-finite loss or gradient; step skipped (params unchanged), "
                    "%d in a row, %d in all", step, self.consecutive, self.total)
    if self.consecutive >= self.limit:
      raise TrainingError(
          f"training diverged: {self.consecutive} consecutive steps up to step {step} had a "
          f"non-finite loss or gradient (training.max_nonfinite_steps={self.limit}); lower "
          f"optimizer.learning_rate or check the data, then resume from the last checkpoint")


class Metrics:
  """Per-step metrics kept on device until a boundary reads them all back at once.

  Each write logs the means since the last write, train/steps_per_sec (training time
  only: evaluations and saves excluded), TFLOP/s and MFU where known, and a progress line
  whose ETA extrapolates this run's wall time per step so far (saves and evaluations
  included) over the steps left.
  """

  def __init__(self, writer: Any, nonfinite: NonfiniteCounter,
               flops_per_step: Optional[float], *, start: int, num_steps: int) -> None:
    """writer from make_writer; flops_per_step of the compiled step (None: unknown); start,
    the run's first step (0, or the resumed checkpoint's); num_steps, training.num_steps."""
    self.writer, self.nonfinite, self.flops_per_step = writer, nonfinite, flops_per_step
    self.pending, self.checked = [], 0
    self.num_steps, self.run_clock = num_steps, (start, time.perf_counter())
    self.restart_clock(start)

  def add(self, step: int, metrics: dict) -> None:
    """Keeps step `step`'s metrics ({name: device scalar}, with "nonfinite") until a write."""
    self.pending.append((step, metrics))

  def check_nonfinite(self) -> None:
    """Reads the not yet checked flags (one transfer) and counts them in step order."""
    unchecked = self.pending[self.checked:]
    flags = jax.device_get([m["nonfinite"] for _, m in unchecked])
    for (step, _), flag in zip(unchecked, flags, strict=True):
      self.nonfinite.observe(step, float(flag))
    self.checked = len(self.pending)

  def write(self, step: int) -> None:
    """Writes the means since the last write, with steps/s, TFLOP/s per device and MFU,
    then logs the progress line (step, percentage, ETA)."""
    self.check_nonfinite()
    values = jax.device_get([m for _, m in self.pending])
    means = jax.tree.map(lambda *xs: float(jnp.mean(jnp.asarray(xs))), *values)
    scalars = {f"train/{k}": v for k, v in means.items()}
    now = time.perf_counter()
    rate = (step - self.clock[0]) / (now - self.clock[1])
    scalars["train/steps_per_sec"] = rate
    scalars.update(performance.utilisation(rate, self.flops_per_step))
    self.writer.write_scalars(step, scalars)
    self.pending, self.checked = [], 0
    self._log_progress(step, now)
    self.restart_clock(step)

  def _log_progress(self, step, now):
    first, started = self.run_clock
    eta = (now - started) / (step - first) * (self.num_steps - step)
    logging.info("step %d of %d (%.1f%%), ETA %d:%02d:%02d", step, self.num_steps,
                 100.0 * step / self.num_steps, eta // 3600, eta % 3600 // 60, eta % 60)

  def restart_clock(self, step: int) -> None:
    """Time from here (after evaluation or checkpointing, which are not training)."""
    self.clock = (step, time.perf_counter())
