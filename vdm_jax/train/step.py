"""The train step as a pure function, with its state pytree, optimizer and EMA.

  state, metrics = train_step(state, batch)
  # the same, in two halves (vdm_jax.train.setup jits them as two programs):
  grads, loss_metrics = gradient_step(state, batch)
  state, metrics = update_step(state, grads, loss_metrics)

The loss is the batch mean of the VDM bound in bits/dim; step i draws its
randomness from fold_in(state.rng, i). The optimizer is AdamW (Loshchilov &
Hutter 2019) after global-norm clipping, with linear warm-up and an optional
cosine decay, and optional gradient accumulation through optax.MultiSteps.
Weight decay skips biases, norm scales (every leaf with ndim <= 1) and the
noise-schedule ("gamma") parameters. Values are checked once, by
vdm_jax.train.config, before anything here runs.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from vdm_jax import ema as ema_lib
from vdm_jax import losses
from vdm_jax import model as model_lib
from vdm_jax.typing import Params


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as one pytree.

  step: int32 scalar, number of train steps (mini-batches) taken.
  params, ema_params: model parameters and their exponential moving average.
  opt_state: optax state.
  rng: uint32 [2] base key; step i uses fold_in(rng, i).
  power_emas: tuple of K param trees, the power-function EMAs of EDM2 (vdm_jax.ema), one
    per optimizer.power_ema_sigma_rels; () when disabled.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  power_emas: tuple = ()


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int, decay: str = "constant",
                           decay_steps: int = 0) -> optax.Schedule:
  """lr(n) = learning_rate * min(1, n / warmup_steps), then constant or decayed to 0.

  After the warm-up, with W = warmup_steps and D = decay_steps, "cosine" multiplies by
  (1 + cos(pi (n - W) / (D - W))) / 2 and "linear" by 1 - (n - W) / (D - W); both reach 0
  at n = D.

  Args:
    learning_rate: peak learning rate (> 0).
    warmup_steps: linear warm-up length in optimizer updates (>= 0).
    decay: "constant", "cosine" or "linear".
    decay_steps: total optimizer updates; the decay reaches 0 there.

  Returns:
    optax schedule: update count -> learning rate.
  """
  if decay == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1))
  if decay == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.linear_schedule(learning_rate, 0.0, max(decay_steps - warmup_steps, 1))],
        [warmup_steps])
  raise ValueError(f"optimizer.decay must be 'constant', 'cosine' or 'linear', got {decay!r}")


def weight_decay_mask(params: Params) -> Params:
  """True for leaves that get weight decay: ndim > 1, not under a "gamma" or "grid_prior" key.

  Returns a pytree of bools with the structure of params (optax.adamw's mask).
  """
  def decays(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim > 1 and not {"gamma", "grid_prior"} & set(names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, schedule: optax.ScalarOrSchedule, b1: float, b2: float, eps: float,
                   weight_decay: float, grad_clip_norm: float = 0.0,
                   accumulation_steps: int = 1) -> optax.GradientTransformation:
  """Clipping + AdamW (Loshchilov & Hutter 2019) (+ MultiSteps when accumulation_steps > 1).

  Args:
    schedule: learning-rate schedule over optimizer updates.
    b1, b2, eps: Adam moments' decay rates and epsilon.
    weight_decay: decoupled weight decay, masked by weight_decay_mask.
    grad_clip_norm: global-norm clip; 0 disables it.
    accumulation_steps: mini-batches averaged per optimizer update (>= 1).

  Returns:
    optax.GradientTransformation.
  """
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps).gradient_transformation()
  return tx


def update_count(opt_state: optax.OptState) -> jax.Array:
  """Optimizer updates applied so far (int32 scalar): the count of optax.scale_by_schedule.

  With optax.MultiSteps it advances once per accumulated update, and never on a
  step that did not reach the optimizer.
  """
  return optax.tree.get(opt_state, "count",
                        filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")


def ema_update(ema_params: Params, params: Params, decay: float | jax.Array) -> Params:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf; a pytree like params.

  The constant-decay EMA of the trainer (see vdm_jax.ema for the power-function EMA of EDM2).
  """
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def power_ema_update(power_emas: tuple, params: Params, count: jax.Array,
                     gammas: Sequence[float]) -> tuple:
  """emas[k] <- vdm_jax.ema.update(emas[k], params, count, gammas[k]) for each k.

  beta_t = (1 - 1/t)^(gamma_k + 1) with t = count, the applied optimizer updates including
  this one (t = 1 copies params).

  Args:
    power_emas: K param trees.
    params: the params after update t.
    count: t, int32 scalar >= 1 (update_count of the new optimizer state).
    gammas: K exponents, Python floats (computed once on the host).

  Returns:
    the K new EMAs, a tuple.
  """
  return tuple(ema_lib.update(e, params, count, g)
               for e, g in zip(power_emas, gammas, strict=True))


def create(params: Params, tx: optax.GradientTransformation, seed: int, *,
           num_power_emas: int = 0) -> TrainState:
  """A fresh TrainState at step 0 (EMAs start at the initial params, rng = PRNGKey(seed)).

  num_power_emas: K, the power-function EMAs to track (their first update overwrites them).
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                    power_emas=tuple(jax.tree.map(jnp.copy, params)
                                     for _ in range(num_power_emas)))


AugmentFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_gradient_step(model: model_lib.VDM, *, augment_fn: Optional[AugmentFn] = None,
                       augment_conditioning: bool = False
                       ) -> Callable[[TrainState, dict], tuple[Params, dict[str, jax.Array]]]:
  """gradient_step(state, batch) -> (grads, loss metrics): the first half of the train step.

  grads: d bpd / d params, a pytree like state.params (float32; may hold NaN/Inf).
  loss metrics: float32 scalars "bpd" (the batch mean of the VDM bound in bits/dim), its
  terms "bpd_prior", "bpd_reconstruction", "bpd_diffusion", and "grad_norm" (global L2
  norm of grads). Step i draws its randomness from key = fold_in(state.rng, i).

  Args:
    model: a vdm_jax.model.VDM.
    augment_fn: optional (key, images [B, H, W, C]) -> (images, moved float32 [B]) applied
      to the batch first (vdm_jax.train.augment.random_shift), with a key of its own
      stream, fold_in(key, 1).
    augment_conditioning: pass moved to the network as its conditioning scalar (the
      loss's `conditioning`), so that c = 0, what evaluation and sampling pass, means
      unaugmented data.
  """
  def gradient_step(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    images, conditioning = batch["image"], None
    if augment_fn is not None:
      images, moved = augment_fn(jax.random.fold_in(key, 1), images)
      conditioning = moved if augment_conditioning else None

    def loss_fn(params):
      labels = batch["label"] if model.config.num_classes > 0 else None
      loss, terms = model.loss(params, images, key, labels=labels, train=True,
                               conditioning=conditioning)
      return jnp.mean(losses.bits_per_dim(loss, model.num_dims)), terms

    (bpd, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    loss_metrics = {"bpd": bpd, "grad_norm": optax.tree.norm(grads)}
    for name in ("prior", "reconstruction", "diffusion"):
      loss_metrics[f"bpd_{name}"] = jnp.mean(losses.bits_per_dim(terms[name], model.num_dims))
    return grads, loss_metrics

  return gradient_step


def make_update_step(model: model_lib.VDM, tx: optax.GradientTransformation, schedule: Callable,
                     *, ema_decay: float, accumulation_steps: int = 1,
                     power_ema_gammas: Sequence[float] = ()
                     ) -> Callable[[TrainState, Params, dict], tuple[TrainState, dict]]:
  """update_step(state, grads, loss metrics) -> (new state, metrics): the second half.

  Takes make_gradient_step's outputs. A step whose "bpd" or "grad_norm" is NaN/Inf keeps
  params, EMA params, power EMAs and optimizer state unchanged (bitwise) and sets
  metrics["nonfinite"] = 1 (else 0); state.step advances either way. metrics: the loss
  metrics ("grad_norm" 0 on a skipped step) plus "learning_rate" (of this update),
  "gamma_0", "gamma_1" (the noise schedule's ends after it) and "nonfinite".

  Args: as make_train_step's.
  """
  gammas = tuple(float(g) for g in power_ema_gammas)
  apply_update = functools.partial(_apply_update, tx, ema_decay, accumulation_steps, gammas)

  def update_step(state, grads, loss_metrics):
    # One scalar decides the step: the global gradient norm is NaN/Inf exactly when a
    # gradient element is (or their squares overflow float32). A skipped step keeps params,
    # EMA and optimizer state bitwise (one lax.cond around the whole update; a jnp.where per
    # leaf made XLA copy the reduction into every leaf's fusion: minutes of compile time).
    finite = jnp.isfinite(loss_metrics["bpd"]) & jnp.isfinite(loss_metrics["grad_norm"])
    params, ema, opt_state, power_emas = jax.lax.cond(
        finite, functools.partial(apply_update, grads), lambda *unchanged: unchanged,
        state.params, state.ema_params, state.opt_state, state.power_emas)
    gamma_fn = model.gamma_fn(params)
    metrics = dict(loss_metrics, grad_norm=jnp.where(finite, loss_metrics["grad_norm"], 0.0),
                   learning_rate=schedule(update_count(state.opt_state)),
                   gamma_0=jnp.squeeze(gamma_fn(jnp.zeros(()))),
                   gamma_1=jnp.squeeze(gamma_fn(jnp.ones(()))),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state, power_emas=power_emas), metrics

  return update_step


def make_train_step(model: model_lib.VDM, tx: optax.GradientTransformation, schedule: Callable, *,
                    ema_decay: float, accumulation_steps: int = 1,
                    power_ema_gammas: Sequence[float] = (),
                    augment_fn: Optional[AugmentFn] = None, augment_conditioning: bool = False
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch) -> (new state, metrics of scalars), pure (jit it).

  update_step(state, *gradient_step(state, batch)): make_gradient_step then
  make_update_step, as one function. batch: {"image": int [B, H, W, C], optionally
  "label": int [B] when the model is class-conditional}. A step whose loss or gradient
  has a NaN/Inf returns params, EMA params, power EMAs and optimizer state unchanged
  (bitwise) and metrics["nonfinite"] = 1 (else 0); state.step still advances, so the
  batch is consumed and the step numbering and data position stay those of an
  uninterrupted run.

  Args:
    model: a vdm_jax.model.VDM.
    tx: the optimizer (make_optimizer).
    schedule: its learning-rate schedule over optimizer updates (for the metrics).
    ema_decay: in [0, 1); 0 makes the EMA the params themselves.
    accumulation_steps: micro-batches per optimizer update (tx wraps optax.MultiSteps).
    power_ema_gammas: exponents of the power-function EMAs in state.power_emas (Python
      floats, from vdm_jax.ema.sigma_rel_to_gamma); each follows applied updates only.
    augment_fn, augment_conditioning: as in make_gradient_step.
  """
  gradient_step = make_gradient_step(model, augment_fn=augment_fn,
                                     augment_conditioning=augment_conditioning)
  update_step = make_update_step(model, tx, schedule, ema_decay=ema_decay,
                                 accumulation_steps=accumulation_steps,
                                 power_ema_gammas=power_ema_gammas)

  def train_step(state, batch):
    return update_step(state, *gradient_step(state, batch))

  return train_step


def _apply_update(tx, ema_decay, accumulation_steps, gammas, grads, params, ema, opt_state,
                  power_emas):
  """One optimizer update (a micro-batch with accumulation) and the EMAs after it.

  With accumulation the parameters move, and the EMAs follow, only when optax.MultiSteps
  applies its averaged update; a skipped (non-finite) micro-batch never reaches
  MultiSteps, so it does not shift the accumulation window. The power EMAs take the
  count of applied updates after this one as their t (EDM2 eq. 127).
  """
  updates_before = update_count(opt_state)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  count = update_count(opt_state)
  if accumulation_steps == 1:
    power_emas = power_ema_update(power_emas, params, count, gammas)
  elif power_emas:
    power_emas = jax.lax.cond(count > updates_before,
                              lambda e: power_ema_update(e, params, count, gammas),
                              lambda e: e, power_emas)
  if ema_decay == 0.0:  # no averaging: the EMA is the params themselves
    return params, params, opt_state, power_emas
  if accumulation_steps == 1:
    return params, ema_update(ema, params, ema_decay), opt_state, power_emas
  applied = count > updates_before
  ema = jax.lax.cond(applied, lambda e: ema_update(e, params, ema_decay), lambda e: e, ema)
  return params, ema, opt_state, power_emas
