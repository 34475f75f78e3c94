"""Inference from checkpoints: restore, evaluate test bits/dim, draw samples.

evaluate(config, workdir) and sample(config, workdir) are `main.py --mode=eval` and
`--mode=sample`; evaluate_and_draw is the training loop's periodic evaluation.
Only process 0 writes files.
"""
import functools
import os
import time
from typing import Any, Optional, Sequence

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
from vdm_jax.train import ema_snapshots
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

  With eval.posthoc_sigma_rels, also the post-hoc EMA of each width (evaluate_posthoc).

  Returns:
    {"step": int (-1 for a clu checkpoint), "bpd", "bpd_stderr", "bpd_<term>", "num_examples",
    "nfe" (eval.method "ode": mean network evaluations per example), "seconds" (wall time of
    the pass, compilation included)} of the classic EMA params, plus "posthoc"
    (evaluate_posthoc's dict) with eval.posthoc_sigma_rels.
  """
  config_lib.validate_config(config, workdir)
  source = data.load_sources(config, ("test",))["test"]
  if checkpoint and config.eval.posthoc_sigma_rels:
    raise ConfigError("eval.posthoc_sigma_rels reconstructs from the power-EMA snapshots of "
                      "--workdir, which --checkpoint does not have; set "
                      "--config.eval.posthoc_sigma_rels='()'")
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
  start = time.perf_counter()
  metrics = setup.evaluate_params(params, source)
  metrics["seconds"] = round(time.perf_counter() - start, 1)
  logging.info("%s: test bits/dim %.6f (%s)", checkpoint or f"step {step}", metrics["bpd"],
               metrics)
  result = {"step": step, **metrics}
  if config.eval.posthoc_sigma_rels:
    result["posthoc"] = evaluate_posthoc(setup, workdir, source, config.eval.posthoc_sigma_rels,
                                         ema_metrics=metrics)
  return result


def posthoc_ema_params(config: ml_collections.ConfigDict, workdir: str, sigma_rel: float, *,
                       step: Optional[int] = None) -> Params:
  """The post-hoc EMA of width sigma_rel (Karras et al. 2024), from workdir's snapshots.

    params = sum_i w_i snapshot_i,  w = vdm_jax.ema.posthoc_weights(snapshots, sigma_rel)
  over every stored (t_i, gamma_i) (ema_snapshots.reconstruct_sweep).

  Args:
    config: the run's ConfigDict.
    workdir: the run's folder (holding ema_snapshots/).
    sigma_rel: target relative width, in (0, vdm_jax.ema.MAX_SIGMA_REL].
    step: target update count, one of the snapshot steps; None: the newest.

  Returns:
    a param tree like TrainState.params (replicated over the mesh).
  """
  config_lib.validate_config(config, workdir)
  setup = setup_lib.get_setup(config)
  return _reconstruct(setup, workdir, [sigma_rel], step)["params"][0]


def _reconstruct(setup, workdir, sigma_rels, step):
  if not os.path.isdir(os.path.join(os.path.abspath(workdir), ema_snapshots.DIRECTORY)):
    raise CheckpointError(f"no EMA snapshots in {workdir}/{ema_snapshots.DIRECTORY}; train "
                          f"with optimizer.power_ema_sigma_rels set")
  store = ema_snapshots.make_store(workdir, create=False)
  try:
    return ema_snapshots.reconstruct_sweep(store, setup.abstract_state().params, sigma_rels,
                                           step=step)
  finally:
    store.close()


def evaluate_posthoc(setup: setup_lib.Setup, workdir: str, source: Any,
                     sigma_rels: Sequence[float], *, step: Optional[int] = None,
                     ema_metrics: Optional[dict] = None) -> dict[str, Any]:
  """Test bits/dim of the post-hoc EMA of each width at the newest (or given) snapshot step.

  Reconstructs all widths in one pass over the snapshots (ema_snapshots.reconstruct_sweep),
  evaluates each with setup.evaluate_params, and logs a table: sigma_rel, the profile's
  relative L2 fit error, test bits/dim +- its standard error.

  Args:
    setup: the run's Setup.
    workdir: the run's folder.
    source: the test split (data.load_sources).
    sigma_rels: M target widths.
    step: target update count (a snapshot step); None: the newest.
    ema_metrics: the classic EMA's evaluate_params metrics, logged for comparison.

  Returns:
    {"snapshot_step": t, "num_snapshots": N profiles, "widths": [M dicts with "sigma_rel",
     "fit_error", "bpd", "bpd_stderr"], "best_sigma_rel", "best_bpd", "best_bpd_stderr",
     and "ema_bpd" when ema_metrics is given}.
  """
  sweep = _reconstruct(setup, workdir, sigma_rels, step)
  widths = []
  for sigma_rel, fit, params in zip(sigma_rels, sweep["fit_errors"], sweep["params"],
                                    strict=True):
    metrics = setup.evaluate_params(params, source)
    widths.append({"sigma_rel": float(sigma_rel), "fit_error": float(fit),
                   "bpd": metrics["bpd"], "bpd_stderr": metrics["bpd_stderr"]})
  best = min(widths, key=lambda w: w["bpd"])
  result = {"snapshot_step": sweep["step"], "num_snapshots": len(sweep["snapshots"]),
            "widths": widths, "best_sigma_rel": best["sigma_rel"], "best_bpd": best["bpd"],
            "best_bpd_stderr": best["bpd_stderr"]}
  lines = [f"post-hoc EMA at update {sweep['step']} from {len(sweep['snapshots'])} snapshot "
           f"profiles, test bits/dim ({setup.config.eval.method}):",
           f"  {'sigma_rel':>9}  {'fit error':>9}  {'bits/dim':>10}  {'+- stderr':>9}"]
  lines += [f"  {w['sigma_rel']:9.4f}  {w['fit_error']:9.2e}  {w['bpd']:10.5f}  "
            f"{w['bpd_stderr']:9.5f}" for w in widths]
  lines.append(f"  best: sigma_rel {best['sigma_rel']:.4f}, {best['bpd']:.5f} +- "
               f"{best['bpd_stderr']:.5f} bits/dim")
  if ema_metrics is not None:
    result["ema_bpd"] = ema_metrics["bpd"]
    lines.append(f"  classic EMA (optimizer.ema_decay={setup.config.optimizer.ema_decay}): "
                 f"{ema_metrics['bpd']:.5f} +- {ema_metrics['bpd_stderr']:.5f} bits/dim")
  logging.info("\n".join(lines))
  return result


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
                      baseline: Optional[float] = None,
                      elapsed_s: Optional[float] = None) -> dict[str, float]:
  """Test bits/dim with EMA params, a sample grid, the gamma(t) plot and the learning curve.

  test_source is the test split (data.load_sources), writer from reporting.make_writer;
  baseline, the per-pixel categorical bits/dim, is logged next to the model's; elapsed_s,
  the run's wall time so far, goes with the result into workdir/eval_history.jsonl and
  workdir/plots/learning_curve.png. Returns the metrics of setup.evaluate_params ("bpd",
  "bpd_stderr", "bpd_<term>", "num_examples").
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
    history = artifacts.record_evaluation(workdir, {"step": int(step), "elapsed_s": elapsed_s,
                                                    **metrics})
    if elapsed_s is not None:
      artifacts.save_learning_curve(os.path.join(workdir, "plots", "learning_curve.png"),
                                    history, baseline=baseline)
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
