"""Sharded VDM training: train_and_evaluate(config, workdir), evaluate, sample.

One jitted train step over a jax.sharding.Mesh of every device of every host
(axis "data"): the global batch is sharded over "data", the TrainState is
replicated and donated, and step i draws its randomness from
fold_in(state.rng, i), so a run's numbers do not depend on the device count
and a resumed run repeats an uninterrupted one exactly. The loss is the mean
over the batch of the VDM bound in bits/dim. Steps with a non-finite loss or
gradient are skipped (state kept) and counted; training.max_nonfinite_steps
of them in a row stop the run (train_loop.TrainingError).
"""
import functools
import os
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdm_jax import checkpoints
from vdm_jax import data
from vdm_jax import likelihood
from vdm_jax import model as model_lib
from vdm_jax import train_state
from vdm_jax import train_loop

SAMPLERS = ("ancestral", "ddim", "ode")


def _require(ok, message):
  if not ok:
    raise ValueError(message)


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _validate_training(config):
  t, e, s = config.training, config.eval, config.sample
  for name, value in (("training.num_steps", t.num_steps), ("training.batch_size", t.batch_size),
                      ("training.log_every", t.log_every),
                      ("training.checkpoint_every", t.checkpoint_every),
                      ("training.keep_checkpoints", t.keep_checkpoints),
                      ("training.max_nonfinite_steps",
                       t.get("max_nonfinite_steps", train_loop.DEFAULT_MAX_NONFINITE_STEPS)),
                      ("eval.batch_size", e.batch_size),
                      ("eval.num_time_samples", e.get("num_time_samples", 1)),
                      ("sample.num_steps", s.num_steps),
                      ("sample.num_images", s.num_images)):
    _require(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
  _require(_is_int(t.eval_every) and t.eval_every >= 0, f"training.eval_every must be an "
           f"integer >= 0 (0: only at the end), got {t.eval_every!r}")
  _require(_is_int(e.num_examples) and e.num_examples >= 0,
           f"eval.num_examples must be an integer >= 0 (0: all), got {e.num_examples!r}")
  _require(s.sampler in SAMPLERS, f"sample.sampler must be one of {SAMPLERS}, got {s.sampler!r}")


def _validate_optimizer(config):
  o = config.optimizer
  for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm",
               "ema_decay"):
    _require(_is_number(o[name]), f"optimizer.{name} must be a number, got {o[name]!r}")
  _require(o.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
  for name in ("b1", "b2", "ema_decay"):
    _require(0.0 <= o[name] < 1.0, f"optimizer.{name} must be in [0, 1), got {o[name]}")
  for name in ("eps", "weight_decay", "grad_clip_norm"):
    _require(o[name] >= 0, f"optimizer.{name} must be >= 0, got {o[name]}")
  _require(_is_int(o.warmup_steps) and o.warmup_steps >= 0,
           f"optimizer.warmup_steps must be an integer >= 0, got {o.warmup_steps!r}")
  _require(_is_int(o.accumulation_steps) and o.accumulation_steps >= 1,
           f"optimizer.accumulation_steps must be an integer >= 1, got {o.accumulation_steps!r}")
  _require(o.decay in ("constant", "cosine"),
           f"optimizer.decay must be 'constant' or 'cosine', got {o.decay!r}")


def validate_config(config, workdir):
  """Fails fast (before any compile) with a one-line ValueError naming the fix."""
  num_devices, num_hosts = jax.device_count(), jax.process_count()
  _require(config.data.dataset in data.DATASETS,
           f"unknown data.dataset {config.data.dataset!r}; expected one of "
           f"{', '.join(data.DATASETS)}")
  _validate_training(config)
  _validate_optimizer(config)
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
    raise ValueError(f"workdir {workdir} is not writable ({err.strerror}); pass a writable "
                     f"--workdir") from None


def create_model(config):
  """VDM(ModelConfig(**config.model)); ConfigDict lists become tuples."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
  try:
    return model_lib.VDM(model_lib.ModelConfig(**fields))
  except TypeError as err:
    raise ValueError(f"config.model must hold exactly ModelConfig's fields: {err}") from None


def make_optimizer(config):
  """(optax transformation, lr schedule over optimizer updates) from config.optimizer."""
  o = config.optimizer
  updates = max(1, config.training.num_steps // o.accumulation_steps)
  schedule = train_state.learning_rate_schedule(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, decay=o.decay,
      decay_steps=updates)
  tx = train_state.make_optimizer(
      schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip_norm, accumulation_steps=o.accumulation_steps)
  return tx, schedule


class Setup:
  """Model, mesh, shardings and jitted steps of one run (built once, reused)."""

  def __init__(self, config):
    self.config = config
    self.model = create_model(config)
    self.conditional = config.model.num_classes > 0
    self.image_shape = tuple(config.model.image_shape)
    self.num_dims = int(np.prod(self.image_shape))
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.tx, self.schedule = make_optimizer(config)
    self._train_step = None
    self._eval_step = None

  def global_batch(self, batch):
    """Host-local numpy batch -> global jax arrays sharded over "data"."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def _labels(self, batch):
    return batch["label"] if self.conditional else None

  def init_state(self):
    """Fresh replicated TrainState from config.seed."""
    def init(key):
      x = jnp.zeros((1, *self.image_shape), jnp.int32)
      labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
      params = self.model.init(key, x, labels)
      return train_state.create(params, self.tx, self.config.seed)
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1)
    return jax.jit(init, out_shardings=self.replicated)(key)

  def abstract_state(self):
    """ShapeDtypeStructs (replicated) of the TrainState, for restoring."""
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def _bpd(self, nats):
    return nats / (self.num_dims * np.log(2.0))

  def train_step(self, state, batch):
    """(state, global batch) -> (new state, metrics of scalars); jitted once, state donated.

    A step whose loss or gradient has a NaN/Inf returns params, EMA params and
    optimizer state unchanged (bitwise) and metrics["nonfinite"] = 1 (else 0);
    state.step still advances, so the batch is consumed and the step numbering
    and data position stay those of an uninterrupted run.
    """
    if self._train_step is None:
      self._train_step = jax.jit(self._train_step_fn, donate_argnums=0,
                                 in_shardings=(self.replicated, self.batch_sharding),
                                 out_shardings=(self.replicated, self.replicated))
    return self._train_step(state, batch)

  def _train_step_fn(self, state, batch):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      loss, metrics = self.model.loss(params, batch["image"], key, labels=self._labels(batch),
                                      train=True)
      return jnp.mean(self._bpd(loss)), metrics

    (bpd, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # One scalar decides the step: the global gradient norm is NaN/Inf exactly when a
    # gradient element is (or their squares overflow float32). A skipped step keeps params,
    # EMA and optimizer state bitwise (one lax.cond around the whole update; a jnp.where per
    # leaf made XLA copy the reduction into every leaf's fusion: minutes of compile time).
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(bpd) & jnp.isfinite(grad_norm)
    updates_before = train_state.update_count(state.opt_state)
    params, ema, opt_state = jax.lax.cond(
        finite, functools.partial(self._apply_update, grads),
        lambda params, ema, opt_state: (params, ema, opt_state),
        state.params, state.ema_params, state.opt_state)
    gamma_fn = self.model.gamma_fn(params)
    metrics = {"bpd": bpd, "grad_norm": jnp.where(finite, grad_norm, 0.0),
               "learning_rate": self.schedule(updates_before),
               "gamma_0": jnp.squeeze(gamma_fn(jnp.zeros(()))),
               "gamma_1": jnp.squeeze(gamma_fn(jnp.ones(()))),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    for name in ("prior", "reconstruction", "diffusion"):
      metrics[f"bpd_{name}"] = jnp.mean(self._bpd(terms[name]))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  def _apply_update(self, grads, params, ema, opt_state):
    """One optimizer update (a micro-batch with accumulation) and the EMA after it.

    With accumulation the parameters move, and the EMA follows, only when optax.MultiSteps
    applies its averaged update; a skipped (non-finite) micro-batch never reaches
    MultiSteps, so it does not shift the accumulation window.
    """
    o = self.config.optimizer
    updates_before = train_state.update_count(opt_state)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if o.ema_decay == 0.0:  # no averaging: the EMA is the params themselves
      return params, params, opt_state
    if o.accumulation_steps == 1:
      return params, train_state.ema_update(ema, params, o.ema_decay), opt_state
    applied = train_state.update_count(opt_state) > updates_before
    ema = jax.lax.cond(applied, lambda e: train_state.ema_update(e, params, o.ema_decay),
                       lambda e: e, ema)
    return params, ema, opt_state

  def _eval_loss(self, params, batch, key):
    loss, terms = self.model.loss(params, batch["image"], key, labels=self._labels(batch),
                                  train=False)
    return loss, {name: terms[name] for name in ("prior", "reconstruction", "diffusion")}

  def evaluate_params(self, params, source):
    """Test bits/dim of `params`: one deterministic pass over `source` (vdm_jax.likelihood).

    Example n uses the noise of fold_in(PRNGKey(seed + 1), n), so the number is
    reproducible from the same params, data and config.

    Returns:
      dict of floats: "bpd", its "bpd_stderr", "bpd_<term>" for prior,
      reconstruction and diffusion, and "num_examples".
    """
    e = self.config.eval
    batches = data.eval_batches(source, batch_size=e.batch_size, num_examples=e.num_examples,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    result = likelihood.evaluate_bpd(self._eval_loss, batches,
                                     jax.random.PRNGKey(self.config.seed + 1), params=params,
                                     num_time_samples=self.config.eval.get("num_time_samples", 1),
                                     mesh=self.mesh)
    metrics = {"bpd": result["bpd"], "bpd_stderr": result["bpd_stderr"],
               "num_examples": result["num_examples"]}
    metrics.update({f"bpd_{name}": result[name] for name in ("prior", "reconstruction",
                                                              "diffusion")})
    return metrics


_SETUPS = {}


def get_setup(config):
  """The Setup of `config`, reused (with its compiled steps) when all but config.data agree."""
  fields = {k: v for k, v in config.to_dict().items() if k != "data"}
  key = (repr(sorted(fields.items())), tuple(jax.devices()))
  if key not in _SETUPS:
    _SETUPS[key] = Setup(config)
  return _SETUPS[key]


def load_sources(config, splits=("train", "test")):
  """{split: random-access source} for config.data."""
  d = config.data
  sources = {split: data.load_source(d.dataset, split, data_dir=d.data_dir, path=d.path,
                                     image_shape=tuple(config.model.image_shape),
                                     test_fraction=d.test_fraction, split_seed=d.split_seed)
             for split in splits}
  for split, source in sources.items():
    data.check_source(source, split=split, image_shape=tuple(config.model.image_shape),
                      vocab_size=config.model.vocab_size, num_classes=config.model.num_classes)
  return sources


def train_and_evaluate(config, workdir):
  """Trains (resuming from workdir/checkpoints if any), evaluates, samples.

  Process 0 holds workdir/LOCK meanwhile: a second trainer on the same workdir
  fails with a ValueError instead of interleaving checkpoints.

  Returns:
    dict of the last evaluation's metrics (test bits/dim, EMA params).
  """
  validate_config(config, workdir)
  sources = load_sources(config)
  setup = get_setup(config)
  if jax.process_index() != 0:  # the processes of one run share the workdir
    return train_loop.run(setup, sources, workdir)
  with checkpoints.WorkdirLock(workdir):
    return train_loop.run(setup, sources, workdir)


def evaluate(config, workdir):
  """Test bits/dim of the EMA params of the newest (or sample.checkpoint_step) checkpoint."""
  validate_config(config, workdir)
  source = load_sources(config, ("test",))["test"]
  setup = get_setup(config)
  step, state = train_loop.restore_for_inference(setup, workdir)
  metrics = setup.evaluate_params(state.ema_params, source)
  logging.info("step %d: test bits/dim %.6f (%s)", step, metrics["bpd"], metrics)
  return {"step": step, **metrics}


def sample(config, workdir):
  """Writes config.sample.num_images samples (PNG grid, .npy, optional GIF) under workdir/samples."""
  validate_config(config, workdir)
  setup = get_setup(config)
  step, state = train_loop.restore_for_inference(setup, workdir)
  return train_loop.write_samples(setup, state.ema_params, step, workdir,
                                  gif=config.sample.gif)
