"""The training loop, evaluation with EMA params, sample grids and checkpoint restore.

Used by vdm_jax.train (which builds the `Setup`: model, mesh, jitted steps).
Only process 0 writes metrics, images and plots; every process takes part in
the computation and in checkpointing.
"""
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import artifacts
from vdm_jax import checkpoints
from vdm_jax import data
from vdm_jax import decoders
from vdm_jax import sampling


def _checkpoint_manager(setup, workdir):
  return checkpoints.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                  max_to_keep=setup.config.training.keep_checkpoints)


def _is_chief():
  return jax.process_index() == 0


def _baseline(sources, vocab_size):
  """Per-pixel categorical baseline (test bits/dim) when both splits are in memory."""
  train, test = sources["train"], sources["test"]
  if isinstance(train, data.ArraySource) and isinstance(test, data.ArraySource):
    return data.categorical_baseline_bpd(train.images, test.images, vocab_size=vocab_size)
  return None


def _write_train_metrics(writer, step, pending):
  means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
  writer.write_scalars(step, {f"train/{k}": float(v) for k, v in means.items()})


class TrainingError(RuntimeError):
  """Training stopped for a reason other than bad input (divergence, full disk)."""


DEFAULT_MAX_NONFINITE_STEPS = 10


class _NonfiniteCounter:
  """Counts consecutive skipped (NaN/Inf) steps, reading each flag one step late.

  Reading the flag of step i after step i+1 was dispatched keeps the device busy.
  """

  def __init__(self, limit):
    self.limit, self.consecutive, self.total, self._last = limit, 0, 0, None

  def update(self, step, flag):
    """Takes step `step`'s device flag; checks the previous one."""
    previous, self._last = self._last, (step, flag)
    if previous is not None:
      self._check(*previous)

  def flush(self):
    if self._last is not None:
      self._check(*self._last)
      self._last = None

  def _check(self, step, flag):
    if float(flag) == 0.0:
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


def _save(manager, step, state, data_state):
  """checkpoints.save, with a full disk turned into a TrainingError."""
  logging.info("saving checkpoint %d", step)
  try:
    checkpoints.save(manager, step, state, data_state)
  except Exception as err:  # pylint: disable=broad-except
    _raise_if_disk_full(err, manager)
    raise


def _raise_if_disk_full(err, manager):
  if checkpoints.is_disk_full(err):
    raise TrainingError(f"no disk space left to write a checkpoint in {manager.directory} "
                        f"({err}); free disk space and resume: the previous checkpoints "
                        f"{sorted(manager.all_steps())} are kept") from None


def run(setup, sources, workdir):
  """Trains to config.training.num_steps, resuming from the newest loadable checkpoint.

  A step with a non-finite loss or gradient is skipped (see Setup.train_step);
  after training.max_nonfinite_steps of them in a row a TrainingError stops
  the run without saving.

  Returns:
    dict: the last evaluation's test metrics (bits/dim of the EMA params).
  """
  # clu's TensorBoard writer imports TensorFlow: only training pays for it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  config, t = setup.config, setup.config.training
  manager = _checkpoint_manager(setup, workdir)
  try:
    restored = checkpoints.restore(manager, setup.abstract_state())
  except BaseException:
    manager.close()
    raise
  iterator = data.TrainIterator(sources["train"], batch_size=t.batch_size, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  if restored is None:
    start, state = 0, setup.init_state()
  else:
    start, state, data_state = restored
    iterator.set_state(data_state)
    logging.info("resumed from checkpoint %d (data position %s)", start, data_state)
  writer = metric_writers.create_default_writer(workdir, just_logging=not _is_chief())
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  baseline = _baseline(sources, config.model.vocab_size)
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer,
                                           every_steps=t.log_every)
  nonfinite = _NonfiniteCounter(t.get("max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS))
  eval_metrics, pending = {}, []
  try:
    for step in range(start, t.num_steps):
      state, metrics = setup.train_step(state, setup.global_batch(next(iterator)))
      pending.append(metrics)
      done = step + 1
      nonfinite.update(done, metrics["nonfinite"])
      report(done)
      if done % t.log_every == 0 or done == t.num_steps:
        _write_train_metrics(writer, done, pending)
        pending = []
      if (t.eval_every and done % t.eval_every == 0) or done == t.num_steps:
        nonfinite.flush()
        with report.timed("eval"):
          eval_metrics = evaluate_and_draw(setup, state, sources["test"], done, workdir,
                                           writer, baseline)
      if done % t.checkpoint_every == 0 or done == t.num_steps:
        nonfinite.flush()
        _save(manager, done, state, iterator.get_state())
    if start >= t.num_steps:
      eval_metrics = setup.evaluate_params(state.ema_params, sources["test"])
    try:
      manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      _raise_if_disk_full(err, manager)
      raise
  finally:
    manager.close()
    writer.flush()
  return eval_metrics


def evaluate_and_draw(setup, state, test_source, step, workdir, writer, baseline=None):
  """Test bits/dim with EMA params, a sample grid and the gamma(t) plot."""
  metrics = setup.evaluate_params(state.ema_params, test_source)
  scalars = {f"test/{k}": v for k, v in metrics.items()}
  if baseline is not None:
    scalars["test/categorical_baseline_bpd"] = baseline
  writer.write_scalars(step, scalars)
  logging.info("step %d: test bits/dim %.4f (per-pixel categorical baseline: %s)", step,
               metrics["bpd"], "n/a" if baseline is None else f"{baseline:.4f}")
  write_samples(setup, state.ema_params, step, workdir, writer=writer)
  if _is_chief():
    t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
    gamma = np.asarray(jax.jit(setup.model.gamma_fn(state.ema_params))(t))
    artifacts.save_gamma_plot(os.path.join(workdir, "plots", f"gamma_{step:08d}.png"), t, gamma,
                              title=f"gamma(t) at step {step}")
  return metrics


def _sample_labels(setup):
  s, num_classes = setup.config.sample, setup.config.model.num_classes
  if num_classes == 0:
    return None
  if s.label >= num_classes:
    raise ValueError(f"sample.label must be -1 or in [0, {num_classes}), got {s.label}")
  if s.label >= 0:
    return jnp.full((s.num_images,), s.label, jnp.int32)
  return jnp.arange(s.num_images, dtype=jnp.int32) % num_classes


def _sample_fn(setup):
  """jitted (params, key) -> int32 images [N, H, W, C] with config.sample's sampler."""
  s, m = setup.config.sample, setup.config.model
  shape = (s.num_images, *setup.image_shape)
  labels = _sample_labels(setup)

  def draw(params, key):
    eps_fn = setup.model.eps_fn(params, labels=labels, guidance_weight=s.guidance_weight)
    gamma_fn = setup.model.gamma_fn(params)
    sampler = {"ancestral": sampling.ancestral_sample, "ddim": sampling.ddim_sample,
               "ode": sampling.ode_sample}[s.sampler]
    z_0 = sampler(eps_fn, gamma_fn, key, shape, num_steps=s.num_steps)
    return decoders.decode(z_0, gamma_fn(jnp.zeros((s.num_images,))), vocab_size=m.vocab_size)
  return jax.jit(draw, out_shardings=setup.replicated)


def _progressive_fn(setup):
  """jitted (params, key) -> x0_hat [F, N, H, W, C] along one ancestral run (t = 1 -> 0).

  The data predictions x0_hat = (z_t - sigma_t eps_hat) / alpha_t at
  sample.gif_frames evenly spaced steps of sample.num_steps (Ho et al. 2020,
  fig. 6), in the encoded scale [-1, 1].
  """
  s = setup.config.sample
  shape = (s.num_images, *setup.image_shape)
  labels = _sample_labels(setup)
  x0_steps = np.unique(np.linspace(0, s.num_steps - 1, s.gif_frames).round().astype(int))

  def progressive(params, key):
    eps_fn = setup.model.eps_fn(params, labels=labels, guidance_weight=s.guidance_weight)
    _, x0_hat = sampling.ancestral_sample(eps_fn, setup.model.gamma_fn(params), key, shape,
                                          num_steps=s.num_steps, x0_steps=x0_steps)
    return x0_hat
  return jax.jit(progressive, out_shardings=setup.replicated)


def write_samples(setup, params, step, workdir, *, writer=None, gif=False):
  """Draws config.sample.num_images images; process 0 writes PNG grid + .npy (+ GIF).

  Returns:
    dict with the written paths ("png", "npy", and "gif" when gif=True).
  """
  s, vocab_size = setup.config.sample, setup.config.model.vocab_size
  if not hasattr(setup, "sample_fn"):
    setup.sample_fn = _sample_fn(setup)
  key = jax.random.PRNGKey(s.seed)
  images = np.asarray(jax.device_get(setup.sample_fn(params, key)))
  stem = os.path.join(workdir, "samples", f"step_{step:08d}_{s.sampler}{s.num_steps}")
  paths = {"png": stem + ".png", "npy": stem + ".npy"}
  grid = artifacts.image_grid(artifacts.to_uint8(images, vocab_size))
  if gif:
    x0_hats = np.asarray(jax.device_get(_progressive_fn(setup)(params, key)))
    paths["gif"] = stem + "_reverse.gif"
    frames = [artifacts.image_grid(np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8))
              for x in x0_hats] + [grid]
  if _is_chief():
    artifacts.save_png(paths["png"], grid)
    np.save(paths["npy"], images)
    if gif:
      artifacts.save_gif(paths["gif"], frames)
    if writer is not None:
      writer.write_images(step, {"samples": grid[None]})
    logging.info("wrote %s", ", ".join(paths.values()))
  return paths


def restore_for_inference(setup, workdir):
  """(step, TrainState) from workdir's newest checkpoint, or sample.checkpoint_step."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):  # do not create it: eval and sample only read
    raise ValueError(f"no checkpoint in {directory}; train first with --mode=train")
  manager = _checkpoint_manager(setup, workdir)
  try:
    wanted = setup.config.sample.checkpoint_step
    restored = checkpoints.restore(manager, setup.abstract_state(),
                                   step=None if wanted < 0 else wanted)
  finally:
    manager.close()
  if restored is None:
    raise ValueError(f"no checkpoint in {manager.directory}; train first with --mode=train")
  step, state, _ = restored
  return step, state
