"""What one run needs, built once: the model, the mesh, the shardings, the compiled steps.

One train step (vdm_jax.train.step), jitted as two programs (gradient, then update;
TwoProgramStep), over a jax.sharding.Mesh of every device of every host (axis
"data"): the global batch is sharded over "data", the TrainState is replicated and
donated to the update, and step i draws its randomness from
fold_in(state.rng, i), so a run's numbers do not depend on the device count and a
resumed run repeats an uninterrupted one exactly.
"""
import collections
from concurrent import futures
import functools
import json
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdm_jax import likelihood
from vdm_jax import ode_likelihood
from vdm_jax.train import augment
from vdm_jax.train import config as config_lib
from vdm_jax.train import data
from vdm_jax.train import performance
from vdm_jax.train import step as step_lib
from vdm_jax.train.errors import ConfigError
from vdm_jax.typing import Params


def use_cpu_devices(count: int) -> None:
  """Makes JAX's CPU backend `count` devices (config.cpu_devices); 0 keeps its default.

  The train step then shares each batch among them, as among accelerators (data
  parallel; the numbers do not depend on the device count). One CPU device runs the small
  convolutions of the digits model on too few threads: on the project's 2-core machine,
  in main.py runs alternating the count, 2 devices took the digits config from 15.6-17.8
  to 19.3-22.1 steps/s and digits_long (then one network at batch 128) from 2.8-3.1 to 4.6-5.0
  (2026-12-02, README).
  Only the CPU backend changes; GPU and TPU runs are unaffected. JAX fixes the count when
  it starts its backends, so call this before JAX's first operation (main.py and the
  notebooks do); later, a different count raises ConfigError.
  """
  config_lib.check_cpu_devices(count)
  if not count:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends started already
    started = len(jax.devices("cpu"))
    if started != count:
      raise ConfigError(
          f"cpu_devices={count}, but JAX's CPU backend already started with {started} "
          f"devices; call vdm_jax.train.use_cpu_devices before JAX's first operation, or "
          f"set --config.cpu_devices=0") from None


class TwoProgramStep(NamedTuple):
  """The train step as two programs run back to back: step(state, batch) -> (state, metrics).

  gradient: (state, batch) -> (grads, loss metrics); reads the state.
  update: (state, grads, loss metrics) -> (new state, metrics); donates the state.
  Either jitted functions or their compiled executables. Two programs rather than one
  because XLA compiles them side by side (Setup.compiled_train_step): on a 2-core CPU
  the CIFAR-10 paper step lowered and compiled in 1.33x the bare network's jit(grad)
  time, where the single fused program took 2.6-3.2x (benchmarks/train_throughput.py,
  README). The gradients pass between them as device arrays; no host transfer.
  """
  gradient: Any
  update: Any

  def __call__(self, state: step_lib.TrainState, batch: dict
               ) -> tuple[step_lib.TrainState, dict[str, jax.Array]]:
    """One train step: update(state, *gradient(state, batch))."""
    return self.update(state, *self.gradient(state, batch))


class Setup:
  """Model, mesh, shardings and the jitted train step of one config (build with get_setup)."""

  def __init__(self, config: ml_collections.ConfigDict) -> None:
    """Builds the model, mesh, shardings and optimizer of `config`; compiles nothing yet."""
    self.config = config
    self.model = config_lib.create_model(config)
    self.conditional = config.model.num_classes > 0
    self.image_shape = tuple(config.model.image_shape)
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    if config.cpu_devices and jax.default_backend() == "cpu" and (
        jax.local_device_count() != config.cpu_devices):
      logging.warning("config.cpu_devices=%d, but this process has %d CPU devices: call "
                      "vdm_jax.train.use_cpu_devices before JAX's first operation (main.py "
                      "does)", config.cpu_devices, jax.local_device_count())
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.tx, self.schedule = config_lib.optimizer_from_config(config)
    self._train_step = None
    self._compiled_train_step = None

  def global_batch(self, batch: dict) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over "data"."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  @functools.cached_property
  def _init(self) -> jax.stages.Wrapped:
    """Jitted key -> fresh replicated TrainState (traced once per Setup)."""
    def init(key):
      x = jnp.zeros((1, *self.image_shape), jnp.int32)
      labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
      params = self.model.init(key, x, labels)
      return step_lib.create(params, self.tx, self.config.seed,
                             num_power_emas=len(self.config.optimizer.power_ema_sigma_rels))
    return jax.jit(init, out_shardings=self.replicated)

  def init_state(self) -> step_lib.TrainState:
    """Fresh replicated TrainState from config.seed."""
    return self._init(jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1))

  @functools.cached_property
  def _abstract_state(self) -> step_lib.TrainState:
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def abstract_state(self) -> step_lib.TrainState:
    """ShapeDtypeStructs (replicated) of the TrainState, for restoring (computed once)."""
    return self._abstract_state

  @property
  def train_step(self) -> TwoProgramStep:
    """The train step, (state, global batch) -> (state, metrics), as two jitted programs.

    step_lib.make_gradient_step (the state is read) then step_lib.make_update_step (the
    state is donated); see TwoProgramStep.
    """
    if self._train_step is None:
      o, d = self.config.optimizer, self.config.data
      augment_fn = functools.partial(augment.random_shift, max_shift=d.augment_shift,
                                     probability=d.augment_probability)
      gradient = step_lib.make_gradient_step(
          self.model, augment_fn=augment_fn if d.augment_shift else None,
          augment_conditioning=d.augment_conditioning)
      update = step_lib.make_update_step(
          self.model, self.tx, self.schedule, ema_decay=o.ema_decay,
          accumulation_steps=o.accumulation_steps,
          power_ema_gammas=config_lib.power_ema_gammas(self.config))
      r = self.replicated
      self._train_step = TwoProgramStep(
          jax.jit(gradient, in_shardings=(r, self.batch_sharding), out_shardings=(r, r)),
          jax.jit(update, donate_argnums=0, in_shardings=(r, r, r), out_shardings=(r, r)))
    return self._train_step

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of a global training batch, sharded over "data"."""
    size = self.config.training.batch_size
    return {"image": jax.ShapeDtypeStruct((size, *self.image_shape), jnp.int32,
                                          sharding=self.batch_sharding),
            "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=self.batch_sharding)}

  def compiled_train_step(self) -> tuple[TwoProgramStep, Optional[float]]:
    """(the train step compiled ahead of time, its FLOPs per step per device or None).

    XLA compiles the gradient program in a thread while Python lowers the update
    program, which then compiles beside it. Compiled once per Setup; the training loop
    calls it directly.
    """
    if self._compiled_train_step is None:
      step, state = self.train_step, self.abstract_state()
      with futures.ThreadPoolExecutor(2) as pool:
        gradient_lowered = step.gradient.lower(state, self.abstract_batch())
        gradient = pool.submit(gradient_lowered.compile)
        update = pool.submit(step.update.lower(state, *gradient_lowered.out_info).compile)
        compiled = TwoProgramStep(gradient.result(), update.result())
      flops = [performance.flops_of(program) for program in compiled]
      self._compiled_train_step = compiled, (None if None in flops else sum(flops))
    return self._compiled_train_step

  def _eval_loss(self, params, batch, key):
    labels = batch["label"] if self.conditional else None
    loss, terms = self.model.loss(params, batch["image"], key, labels=labels, train=False)
    return loss, {name: terms[name] for name in ("prior", "reconstruction", "diffusion")}

  @functools.cached_property
  def _ode_loss(self):
    e = self.config.eval
    labels = lambda batch: batch["label"] if self.conditional else None
    return ode_likelihood.ode_loss_fn(
        lambda params, batch: self.model.eps_fn(params, labels=labels(batch)),
        self.model.gamma_fn, dequantization=e.ode_dequantization,
        vocab_size=self.model.config.vocab_size, num_probes=e.ode_num_probes, rtol=e.ode_rtol,
        atol=e.ode_atol)

  def evaluate_params(self, params: Params, source: Any) -> dict[str, float]:
    """Test bits/dim of `params`: one deterministic pass over `source` (vdm_jax.likelihood).

    eval.method "elbo": the VDM bound with eval.num_time_samples antithetic times per
    example (terms prior, reconstruction, diffusion). "ode": the probability-flow ODE
    likelihood with eval.ode_dequantization (vdm_jax.ode_likelihood.ode_loss_fn; terms
    prior, flow, dequantization, and reconstruction for the variational bound), one
    sample per example, and "nfe", the mean network evaluations per example. Example n
    uses the noise of fold_in(PRNGKey(seed + 1), n), so the number is reproducible from
    the same params, data and config.

    Returns:
      dict of floats: "bpd", its "bpd_stderr", "bpd_<term>" for each term of the method,
      "num_examples", and "nfe" for the ODE.
    """
    e = self.config.eval
    ode = e.method == "ode"
    batches = data.eval_batches(source, batch_size=e.batch_size, num_examples=e.num_examples)
    counts = ("nfe",) if ode else ()
    result = likelihood.evaluate_bpd(self._ode_loss if ode else self._eval_loss, batches,
                                     jax.random.PRNGKey(self.config.seed + 1), params=params,
                                     num_time_samples=1 if ode else e.num_time_samples,
                                     mesh=self.mesh, counts=counts)
    kept = ("bpd", "bpd_stderr", "num_examples", *counts)
    metrics = {name: result[name] for name in kept}
    metrics.update({f"bpd_{name}": value for name, value in result.items()
                    if name not in (*kept, "nats")})
    return metrics


_SETUPS: "collections.OrderedDict[tuple, Setup]" = collections.OrderedDict()
_MAX_SETUPS = 4


def get_setup(config: ml_collections.ConfigDict) -> Setup:
  """The Setup of `config`, reused (with its compiled steps) when all but config.data agree.

  A bounded cache of the most recent configs of this process (and their devices).
  """
  fields = {k: v for k, v in config.to_dict().items() if k != "data"}
  key = (json.dumps(fields, sort_keys=True, default=repr), tuple(jax.devices()))
  if key in _SETUPS:
    _SETUPS.move_to_end(key)
    return _SETUPS[key]
  setup = _SETUPS[key] = Setup(config)
  while len(_SETUPS) > _MAX_SETUPS:
    _SETUPS.popitem(last=False)
  return setup
