"""Inference from checkpoints: restore, evaluate test bits/dim, draw samples.

evaluate(config, workdir) and sample(config, workdir) are `main.py --mode=eval` and
`--mode=sample`; evaluate_and_draw is the training loop's periodic evaluation.
Only process 0 writes files.
"""
import functools
import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import decoders
from vdm_jax import reference
from vdm_jax import sampling
from vdm_jax.train import artifacts
from vdm_jax.train import checkpoints
from vdm_jax.train import config as config_lib
from vdm_jax.train import data
from vdm_jax.train import setup as setup_lib
from vdm_jax.train import step as step_lib
from vdm_jax.train.errors import CheckpointError
from vdm_jax.train.errors import ConfigError
from vdm_jax.typing import Params

_SAMPLERS = {"ancestral": sampling.ancestral_sample, "ddim": sampling.ddim_sample,
             "ode": sampling.ode_sample}


def restore(config: ml_collections.ConfigDict, workdir: str, *,
            step: int = -1) -> tuple[setup_lib.Setup, int, step_lib.TrainState]:
  """(setup, step, TrainState) of a trained run: its Setup and checkpoint `step` (-1: newest)."""
  config_lib.validate_config(config, workdir)
  setup = setup_lib.get_setup(config)
  step, state = restore_for_inference(setup, workdir, step)
  return setup, step, state


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             checkpoint: Optional[str] = None) -> dict:
  """Test bits/dim (eval.method: the ELBO or the ODE likelihood) of a checkpoint's EMA params.

  Args:
    config: the run's ConfigDict.
    workdir: the run's folder; its newest checkpoint (or eval.checkpoint_step) is used.
    checkpoint: instead, a google-research/vdm clu checkpoint directory (local or gs://,
      holding ckpt-N.flax; vdm_jax.reference.load_clu_checkpoint), read with the config's
      model and validated leaf by leaf.

  Returns:
    {"step": int (-1 for a clu checkpoint), "bpd", "bpd_stderr", "bpd_<term>", "num_examples"}.
  """
  config_lib.validate_config(config, workdir)
  source = data.load_sources(config, ("test",))["test"]
  if checkpoint:
    setup, step = setup_lib.get_setup(config), -1
    try:
      params = reference.load_clu_checkpoint(checkpoint, setup.model)
    except ValueError as err:  # reference lists every bad leaf, one per line
      lines = str(err).splitlines()
      more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
      raise CheckpointError(f"{checkpoint} does not fit the config's model: "
                            f"{' '.join(lines[:2])}{more}; use the config the checkpoint was "
                            f"trained with") from None
  else:
    setup, step, state = restore(config, workdir, step=config.eval.checkpoint_step)
    params = state.ema_params
  metrics = setup.evaluate_params(params, source)
  logging.info("%s: test bits/dim %.6f (%s)", checkpoint or f"step {step}", metrics["bpd"],
               metrics)
  return {"step": step, **metrics}


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes config.sample.num_images samples (PNG grid, .npy, optional GIF) under workdir/samples."""
  setup, step, state = restore(config, workdir, step=config.sample.checkpoint_step)
  return write_samples(setup, state.ema_params, step, workdir, gif=config.sample.gif)


def restore_for_inference(setup: setup_lib.Setup, workdir: str,
                          step: int = -1) -> tuple[int, step_lib.TrainState]:
  """(step, TrainState) from workdir's newest checkpoint (step -1) or checkpoint `step`."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):  # do not create it: eval and sample only read
    raise CheckpointError(f"no checkpoint in {directory}; train first with --mode=train")
  manager = checkpoints.make_manager(directory)
  try:
    restored = checkpoints.restore(manager, setup.abstract_state(),
                                   step=None if step < 0 else step)
  finally:
    manager.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint in {directory}; train first with --mode=train")
  step, state, _ = restored
  return step, state


def evaluate_and_draw(setup: setup_lib.Setup, state: step_lib.TrainState, test_source: Any,
                      step: int, workdir: str, writer: Any,
                      baseline: Optional[float] = None) -> dict[str, float]:
  """Test bits/dim with EMA params, a sample grid and the gamma(t) plot.

  test_source is the test split (data.load_sources), writer a clu metric writer; baseline, the
  per-pixel categorical bits/dim, is logged next to the model's. Returns the metrics of
  setup.evaluate_params ("bpd", "bpd_stderr", "bpd_<term>", "num_examples").
  """
  metrics = setup.evaluate_params(state.ema_params, test_source)
  scalars = {f"test/{k}": v for k, v in metrics.items()}
  if baseline is not None:
    scalars["test/categorical_baseline_bpd"] = baseline
  writer.write_scalars(step, scalars)
  logging.info("step %d: test bits/dim %.4f (per-pixel categorical baseline: %s)", step,
               metrics["bpd"], "n/a" if baseline is None else f"{baseline:.4f}")
  write_samples(setup, state.ema_params, step, workdir, writer=writer)
  if jax.process_index() == 0:
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
    raise ConfigError(f"sample.label must be -1 or in [0, {num_classes}), got {s.label}")
  if s.label >= 0:
    return jnp.full((s.num_images,), s.label, jnp.int32)
  return jnp.arange(s.num_images, dtype=jnp.int32) % num_classes


@functools.lru_cache(maxsize=4)
def _sample_fn(setup):
  """jitted (params, key) -> int32 images [N, H, W, C] with config.sample's sampler."""
  s, m = setup.config.sample, setup.config.model
  shape = (s.num_images, *setup.image_shape)
  labels = _sample_labels(setup)

  def draw(params, key):
    eps_fn = setup.model.eps_fn(params, labels=labels, guidance_weight=s.guidance_weight)
    gamma_fn = setup.model.gamma_fn(params)
    z_0 = _SAMPLERS[s.sampler](eps_fn, gamma_fn, key, shape, num_steps=s.num_steps)
    return decoders.decode(z_0, gamma_fn(jnp.zeros((s.num_images,))), vocab_size=m.vocab_size)
  return jax.jit(draw, out_shardings=setup.replicated)


@functools.lru_cache(maxsize=4)
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


def write_samples(setup: setup_lib.Setup, params: Params, step: int, workdir: str, *,
                  writer: Any = None, gif: bool = False) -> dict[str, str]:
  """Draws config.sample.num_images images; process 0 writes PNG grid + .npy (+ GIF).

  Returns:
    dict with the written paths ("png", "npy", and "gif" when gif=True).
  """
  s, vocab_size = setup.config.sample, setup.config.model.vocab_size
  key = jax.random.PRNGKey(s.seed)
  images = np.asarray(jax.device_get(_sample_fn(setup)(params, key)))
  stem = os.path.join(workdir, "samples", f"step_{step:08d}_{s.sampler}{s.num_steps}")
  paths = {"png": stem + ".png", "npy": stem + ".npy"}
  grid = artifacts.image_grid(artifacts.to_uint8(images, vocab_size))
  if gif:
    x0_hats = np.asarray(jax.device_get(_progressive_fn(setup)(params, key)))
    paths["gif"] = stem + "_reverse.gif"
    frames = [artifacts.image_grid(np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8))
              for x in x0_hats] + [grid]
  if jax.process_index() == 0:
    artifacts.save_png(paths["png"], grid)
    np.save(paths["npy"], images)
    if gif:
      artifacts.save_gif(paths["gif"], frames)
    if writer is not None:
      writer.write_images(step, {"samples": grid[None]})
    logging.info("wrote %s", ", ".join(paths.values()))
  return paths
