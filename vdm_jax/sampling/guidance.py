r"""Classifier-free guidance (Ho & Salimans 2022): a conditional eps_fn -> a guided one."""
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.typing import CondEpsFn, EpsFn


def classifier_free_guidance(cond_eps_fn: CondEpsFn, labels: ArrayLike, null_label: int,
                             weight: float | jax.Array) -> EpsFn:
  r"""Wraps a conditional noise model into a guided eps_fn (Ho & Salimans 2022).

    eps_guided(z, gamma) = (1 + w) eps(z, gamma, c) - w eps(z, gamma, null)
                         = eps_c + w (eps_c - eps_null)
  Both predictions come from one call of cond_eps_fn on the doubled batch
  [z, z] with labels [c, null].

  Args:
    cond_eps_fn: cond_eps_fn(z [B, ...], gamma [B], labels [B]) -> eps_hat [B, ...].
    labels: int [B] class labels c.
    null_label: the label of the unconditional model (e.g. num_classes).
    weight: guidance weight w >= 0 (w = 0 gives the conditional model), may be traced.

  Returns:
    eps_fn(z_t [B, ...], gamma_t scalar or [B]) -> eps_hat [B, ...].
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D [B], got shape {labels.shape}")
  if not isinstance(weight, jax.Array) and not weight >= 0:
    raise ValueError(f"guidance weight must be >= 0, got {weight!r}")
  null = jnp.full_like(labels, null_label)

  def eps_fn(z_t: jax.Array, gamma_t: ArrayLike) -> jax.Array:
    batch = z_t.shape[0]
    if batch != labels.shape[0]:
      raise ValueError(f"z_t has batch {batch} but {labels.shape[0]} labels were bound")
    gamma = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (batch,))
    eps = cond_eps_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([gamma, gamma]),
                      jnp.concatenate([labels, null]))
    eps_c, eps_null = eps[:batch], eps[batch:]
    return eps_c + weight * (eps_c - eps_null)

  return eps_fn
