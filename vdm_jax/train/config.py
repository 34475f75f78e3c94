"""The trainer's configuration: the base ConfigDict, its validation, and what it builds.

`default_config()` is the base every experiment in configs/ starts from; its model
section is derived from vdm_jax.model.ModelConfig's defaults (one home). Everything
is validated here, once, before anything compiles: a bad value raises ConfigError
with one line naming the field, the value and the fix.
"""
import dataclasses
import os
import tempfile
from typing import Any

import jax
import ml_collections
import optax

from vdm_jax import _numerics
from vdm_jax import ema
from vdm_jax import model as model_lib
from vdm_jax import ode_likelihood
from vdm_jax.train import data
from vdm_jax.train import step
from vdm_jax.train.errors import ConfigError

SAMPLERS = ("ancestral", "ddim", "ode")
EVAL_METHODS = ("elbo", "ode")


def model_config() -> ml_collections.ConfigDict:
  """ModelConfig's fields with their defaults, as a ConfigDict (tuples stay tuples)."""
  return ml_collections.ConfigDict(dataclasses.asdict(model_lib.ModelConfig()))


def default_config() -> ml_collections.ConfigDict:
  """The base config (CIFAR-10 shapes); configs/*.py override it for each experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # XLA devices made of the host CPU (setup.use_cpu_devices, which main.py calls before JAX
  # starts): 0 keeps JAX's default; N splits the CPU into N devices that share each batch.
  config.cpu_devices = 0
  config.data = ml_collections.ConfigDict(dict(
      dataset="cifar10",   # digits | mnist | fashion_mnist | cifar10 | imagenet32 | imagenet64 | npz | image_folder
      data_dir="",         # tfds data_dir ("" = tfds default, ~/tensorflow_datasets)
      path="",             # .npz file or image folder (npz / image_folder only)
      test_fraction=0.1,   # npz / image_folder: held-out fraction
      split_seed=0,        # npz / image_folder: seed of the fixed train/test split
      augment_shift=0,     # training images move by up to this many pixels (0: none)
      augment_probability=1.0,  # the chance that a training image is moved
      augment_conditioning=False,  # the network's conditioning scalar = 1 for moved images
                                   # (0, what evaluation and sampling use: unmoved data)
      num_threads=data.NUM_THREADS,  # background threads reading batches (0: read in the loop)
      prefetch_batches=data.PREFETCH_BATCHES,  # batches read ahead of the train step
  ))
  config.model = model_config()
  config.optimizer = _optimizer_section()
  config.training = ml_collections.ConfigDict(dict(
      batch_size=128,          # global batch over all devices and hosts
      num_steps=10_000_000,    # train steps (mini-batches); not model.num_steps (T)
      log_every=100,
      eval_every=10_000,
      checkpoint_every=10_000,
      keep_checkpoints=3,
      max_nonfinite_steps=10,  # stop after this many non-finite steps in a row (each is skipped)
      ema_snapshot_every=0,    # optimizer updates between power-EMA snapshots; 0: at checkpoints
      tensorboard=True,        # False: metrics go to the log only, and TensorFlow (clu's
                               # TensorBoard writer) is never imported: a faster, smaller process
  ))
  config.eval = _eval_section()
  config.sample = ml_collections.ConfigDict(dict(
      sampler="ancestral",     # ancestral | ddim | ode
      num_steps=1000,          # sampler steps; not model.num_steps (T)
      num_images=64,
      guidance_weight=0.0,     # class-conditional models only
      label=-1,                # class of the samples; -1 cycles over classes
      gif=False,               # --mode=sample also writes the reverse process as a GIF
      gif_frames=20,
      checkpoint_step=-1,      # --mode=sample: -1 = newest checkpoint
      seed=1,
  ))
  return config


def _optimizer_section():
  """config.optimizer: AdamW, its schedule, clipping, accumulation and the EMAs."""
  return ml_collections.ConfigDict(dict(
      learning_rate=2e-4,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.01,
      warmup_steps=100,
      decay="constant",        # constant | cosine | linear (to 0 at training.num_steps)
      grad_clip_norm=1.0,      # global-norm clipping; 0 disables it
      accumulation_steps=1,    # >1: optax.MultiSteps over that many batches
      ema_decay=0.9999,
      # Power-function EMAs (Karras et al. 2024) kept for post-hoc EMA: their relative
      # widths, each in (0, 12^-1/2]; () disables them (and the snapshots).
      power_ema_sigma_rels=ema.DEFAULT_SIGMA_RELS,
  ))


def _eval_section():
  """config.eval: how test bits/dim are computed."""
  return ml_collections.ConfigDict(dict(
      batch_size=128,
      num_examples=0,          # 0 = the whole test split
      num_time_samples=1,      # K antithetic time samples per example (more: lower variance)
      checkpoint_step=-1,      # --mode=eval: -1 = newest checkpoint
      method="elbo",           # elbo (the VDM bound) | ode (probability-flow ODE likelihood)
      ode_dequantization="variational",  # ode: variational | truncated_normal | uniform
      ode_rtol=1e-5,           # ode: the adaptive solver's relative and absolute tolerances
      ode_atol=1e-5,
      ode_num_probes=1,        # ode: Hutchinson probes per example
      # --mode=eval: also reconstruct and evaluate the post-hoc EMA of each of these widths
      # from the power-EMA snapshots, e.g. (0.02, 0.05, 0.08, 0.1, 0.15, 0.2); () = none.
      posthoc_sigma_rels=(),
  ))


def _require(ok, message):
  if not ok:
    raise ConfigError(message)


def _validate_training(config):
  t, e, s = config.training, config.eval, config.sample
  for name, value in (("training.num_steps", t.num_steps), ("training.batch_size", t.batch_size),
                      ("training.log_every", t.log_every),
                      ("training.checkpoint_every", t.checkpoint_every),
                      ("training.keep_checkpoints", t.keep_checkpoints),
                      ("training.max_nonfinite_steps", t.max_nonfinite_steps),
                      ("eval.batch_size", e.batch_size),
                      ("eval.num_time_samples", e.num_time_samples),
                      ("sample.num_steps", s.num_steps),
                      ("sample.num_images", s.num_images)):
    _require(_numerics.is_int(value) and value > 0,
             f"{name} must be a positive integer, got {value!r}")
  _require(_numerics.is_int(t.eval_every) and t.eval_every >= 0, f"training.eval_every must be "
           f"an integer >= 0 (0: only at the end), got {t.eval_every!r}")
  _require(isinstance(t.tensorboard, bool),
           f"training.tensorboard must be True or False, got {t.tensorboard!r}")
  _require(_numerics.is_int(e.num_examples) and e.num_examples >= 0,
           f"eval.num_examples must be an integer >= 0 (0: all), got {e.num_examples!r}")
  _require(s.sampler in SAMPLERS, f"sample.sampler must be one of {SAMPLERS}, got {s.sampler!r}")
  _validate_eval_method(e)


def _validate_eval_method(e):
  _require(e.method in EVAL_METHODS, f"eval.method must be one of {EVAL_METHODS}, got "
           f"{e.method!r}; set --config.eval.method")
  _require(e.ode_dequantization in ode_likelihood.DEQUANTIZERS,
           f"eval.ode_dequantization must be one of {tuple(ode_likelihood.DEQUANTIZERS)}, got "
           f"{e.ode_dequantization!r}")
  for name in ("ode_rtol", "ode_atol"):
    _require(_numerics.is_number(e[name]) and e[name] > 0, f"eval.{name} must be > 0, got {e[name]!r}")
  _require(_numerics.is_int(e.ode_num_probes) and e.ode_num_probes > 0,
           f"eval.ode_num_probes must be a positive integer, got {e.ode_num_probes!r}")


def _validate_data(config):
  d = config.data
  _require(d.dataset in data.DATASETS,
           f"unknown data.dataset {d.dataset!r}; expected one of {', '.join(data.DATASETS)}")
  for name in ("num_threads", "prefetch_batches"):
    _require(_numerics.is_int(d.get(name)) and d.get(name) >= 0,
             f"data.{name} must be an integer >= 0 (0: read batches in the training loop), "
             f"got {d.get(name)!r}; set --config.data.{name}")
  height, width = config.model.image_shape[:2]
  _require(_numerics.is_int(d.augment_shift) and 0 <= d.augment_shift < min(height, width),
           f"data.augment_shift must be an integer in [0, {min(height, width)}) pixels, got "
           f"{d.augment_shift!r}; set --config.data.augment_shift")
  _require(_numerics.is_number(d.augment_probability) and 0 < d.augment_probability <= 1,
           f"data.augment_probability must be a number in (0, 1], got "
           f"{d.augment_probability!r}; set --config.data.augment_probability")
  _require(not d.augment_conditioning or d.augment_shift > 0,
           "data.augment_conditioning=True needs data.augment_shift > 0 (nothing moves "
           "otherwise); set --config.data.augment_shift")


def _validate_optimizer(config):
  o = config.optimizer
  for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm",
               "ema_decay"):
    _require(_numerics.is_number(o[name]), f"optimizer.{name} must be a number, got {o[name]!r}")
  _require(o.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
  for name in ("b1", "b2", "ema_decay"):
    _require(0.0 <= o[name] < 1.0, f"optimizer.{name} must be in [0, 1), got {o[name]}")
  for name in ("eps", "weight_decay", "grad_clip_norm"):
    _require(o[name] >= 0, f"optimizer.{name} must be >= 0, got {o[name]}")
  _require(_numerics.is_int(o.warmup_steps) and o.warmup_steps >= 0,
           f"optimizer.warmup_steps must be an integer >= 0, got {o.warmup_steps!r}")
  _require(_numerics.is_int(o.accumulation_steps) and o.accumulation_steps >= 1,
           f"optimizer.accumulation_steps must be an integer >= 1, got {o.accumulation_steps!r}")
  _require(o.decay in ("constant", "cosine", "linear"),
           f"optimizer.decay must be 'constant', 'cosine' or 'linear', got {o.decay!r}")
  _check_sigma_rels("optimizer.power_ema_sigma_rels", o.power_ema_sigma_rels)


def _check_sigma_rels(name, values):
  """A tuple of distinct EMA widths in (0, ema.MAX_SIGMA_REL]."""
  _require(isinstance(values, (tuple, list)) and all(_numerics.is_number(v) for v in values),
           f"{name} must be a tuple of numbers, got {values!r}; e.g. --config.{name}='(0.05, 0.1)'")
  for v in values:
    _require(0.0 < v <= ema.MAX_SIGMA_REL, f"{name} has {v}, outside (0, "
             f"{ema.MAX_SIGMA_REL:.4f}] (12^-1/2: the average of all steps); set --config.{name}")
  _require(len(set(values)) == len(values),
           f"{name}={tuple(values)} repeats a width; list each once")


def _validate_power_ema(config):
  o, t, e = config.optimizer, config.training, config.eval
  _require(_numerics.is_int(t.ema_snapshot_every) and t.ema_snapshot_every >= 0,
           f"training.ema_snapshot_every must be an integer >= 0 (optimizer updates between "
           f"snapshots; 0: at every checkpoint), got {t.ema_snapshot_every!r}")
  _check_sigma_rels("eval.posthoc_sigma_rels", e.posthoc_sigma_rels)
  _require(not e.posthoc_sigma_rels or o.power_ema_sigma_rels,
           "eval.posthoc_sigma_rels needs power-EMA snapshots, but "
           "optimizer.power_ema_sigma_rels is (); train with e.g. "
           "--config.optimizer.power_ema_sigma_rels='(0.05, 0.1)' or set "
           "--config.eval.posthoc_sigma_rels='()'")


def check_cpu_devices(count: Any) -> None:
  """ConfigError unless config.cpu_devices is an integer >= 0."""
  _require(_numerics.is_int(count) and count >= 0, f"cpu_devices must be an integer >= 0 "
           f"(0: JAX's default), got {count!r}; set --config.cpu_devices")


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails fast (before any compile) with a one-line ConfigError naming the fix."""
  num_devices, num_hosts = jax.device_count(), jax.process_count()
  check_cpu_devices(config.cpu_devices)
  _validate_data(config)
  _validate_training(config)
  _validate_optimizer(config)
  _validate_power_ema(config)
  create_model(config)  # ModelConfig checks its own fields
  for name in ("training.batch_size", "eval.batch_size"):
    value = config[name.split(".")[0]].batch_size
    _require(value % num_devices == 0 and value % num_hosts == 0,
             f"{name}={value} is not divisible by the {num_devices} devices "
             f"({num_hosts} processes); set --config.{name} to a multiple of {num_devices}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as err:
    raise ConfigError(f"workdir {workdir} is not writable ({err.strerror}); pass a writable "
                      f"--workdir") from None


def create_model(config: ml_collections.ConfigDict) -> model_lib.VDM:
  """VDM(ModelConfig(**config.model)); ConfigDict lists become tuples."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
  try:
    return model_lib.VDM(model_lib.ModelConfig(**fields))
  except TypeError as err:
    raise ConfigError(f"config.model must hold exactly ModelConfig's fields: {err}") from None
  except ValueError as err:
    raise ConfigError(str(err)) from None


def power_ema_gammas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """Exponents gamma_k of optimizer.power_ema_sigma_rels (EDM2 eq. 126), on the host, once."""
  return tuple(ema.sigma_rel_to_gamma(s) for s in config.optimizer.power_ema_sigma_rels)


def optimizer_from_config(config: ml_collections.ConfigDict
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, lr schedule over optimizer updates) from config.optimizer."""
  o = config.optimizer
  updates = max(1, config.training.num_steps // o.accumulation_steps)
  schedule = step.learning_rate_schedule(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, decay=o.decay,
      decay_steps=updates)
  tx = step.make_optimizer(
      schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip_norm, accumulation_steps=o.accumulation_steps)
  return tx, schedule
