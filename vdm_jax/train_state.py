"""Training state pytree, optimizer and EMA for the VDM trainer.

The optimizer is AdamW (Loshchilov & Hutter 2019) after global-norm clipping,
with linear warm-up and an optional cosine decay, and optional gradient
accumulation through optax.MultiSteps. Weight decay skips biases, norm scales
(every leaf with ndim <= 1) and the noise-schedule ("gamma") parameters.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as one pytree.

  step: int32 scalar, number of train steps (mini-batches) taken.
  params, ema_params: model parameters and their exponential moving average.
  opt_state: optax state.
  rng: uint32 [2] base key; step i uses fold_in(rng, i).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate_schedule(*, learning_rate, warmup_steps, decay="constant", decay_steps=0):
  """lr(n) = learning_rate * min(1, n / warmup_steps) [* cosine decay to 0 over decay_steps].

  Args:
    learning_rate: peak learning rate (> 0).
    warmup_steps: linear warm-up length in optimizer updates (>= 0).
    decay: "constant" or "cosine".
    decay_steps: total optimizer updates; the cosine reaches 0 there.

  Returns:
    optax schedule: update count -> learning rate.
  """
  if learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {learning_rate}")
  if warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup_steps}")
  if decay == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1))
  raise ValueError(f"optimizer.decay must be 'constant' or 'cosine', got {decay!r}")


def weight_decay_mask(params):
  """True for leaves that get weight decay: ndim > 1 and not under a "gamma" key."""
  def decays(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim > 1 and "gamma" not in names
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, schedule, b1, b2, eps, weight_decay, grad_clip_norm=0.0,
                   accumulation_steps=1):
  """Clipping + AdamW (+ MultiSteps when accumulation_steps > 1).

  Args:
    schedule: learning-rate schedule over optimizer updates.
    b1, b2, eps: Adam moments' decay rates and epsilon.
    weight_decay: decoupled weight decay, masked by weight_decay_mask.
    grad_clip_norm: global-norm clip; 0 disables it.
    accumulation_steps: mini-batches averaged per optimizer update (>= 1).

  Returns:
    optax.GradientTransformation.
  """
  if accumulation_steps < 1:
    raise ValueError(f"optimizer.accumulation_steps must be >= 1, got {accumulation_steps}")
  if grad_clip_norm < 0:
    raise ValueError(f"optimizer.grad_clip_norm must be >= 0, got {grad_clip_norm}")
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps).gradient_transformation()
  return tx


def update_count(opt_state):
  """Optimizer updates applied so far (int32 scalar): the count of optax.scale_by_schedule.

  With optax.MultiSteps it advances once per accumulated update, and never on a
  step that did not reach the optimizer.
  """
  return optax.tree.get(opt_state, "count",
                        filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create(params, tx, seed):
  """A fresh TrainState at step 0 (EMA starts at the initial params)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))
