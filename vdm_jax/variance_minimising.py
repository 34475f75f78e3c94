r"""The variance-minimising schedule gradient of VDM appendix I.2.

With gamma(t) = gamma_0 + (gamma_1 - gamma_0) g(t), the expected continuous-time
diffusion loss depends on the schedule only through its endpoints (VDM eq. 20), so
the free shape g can be trained to minimise the loss's variance instead: the shape
parameters receive d E[L^2] while everything else receives d E[L]. Same units and
shapes as `vdm_jax.losses` (nats per example summed over H, W, C, shape [B]).
"""
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Terms


def _diffusion_from_shape(eps_fn, f, eps, gamma_0, gamma_1, g_t, dg_t):
  """Continuous diffusion loss [B] with gamma_t = gamma_0 + (gamma_1 - gamma_0) g_t."""
  gamma_t = gamma_0 + (gamma_1 - gamma_0) * g_t
  eps_hat = eps_fn(gaussian.sample_forward(f, gamma_t, eps), gamma_t)
  return losses.diffusion_loss(eps, eps_hat, (gamma_1 - gamma_0) * dg_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _second_moment_for_shape(fn, gamma_0, gamma_1, g_t, dg_t, *consts):
  return fn(gamma_0, gamma_1, g_t, dg_t, *consts)


def _second_moment_fwd(fn, gamma_0, gamma_1, g_t, dg_t, *consts):
  loss, vjp_fn = jax.vjp(fn, gamma_0, gamma_1, g_t, dg_t, *consts)
  return loss, (loss, vjp_fn)


def _second_moment_bwd(fn, residuals, cotangent):
  del fn
  loss, vjp_fn = residuals
  d_gamma_0, d_gamma_1, d_g_t, d_dg_t, *d_consts = vjp_fn(cotangent)
  # d(L_i^2) / d g = 2 L_i dL_i / d g, per example: only the shape inputs are rescaled.
  scale = 2.0 * loss
  return (d_gamma_0, d_gamma_1, scale * d_g_t, scale * d_dg_t, *d_consts)


_second_moment_for_shape.defvjp(_second_moment_fwd, _second_moment_bwd)


def variance_minimising_diffusion_loss(eps_fn: EpsFn, gamma_0: ArrayLike, gamma_1: ArrayLike,
                                       shape_fn: GammaFn, f: ArrayLike, t: ArrayLike,
                                       eps: ArrayLike) -> jax.Array:
  r"""Continuous diffusion loss [B] whose schedule-shape gradient minimises its variance.

  The schedule is gamma(t) = gamma_0 + (gamma_1 - gamma_0) g(t) with g = shape_fn,
  monotone, g(0) = 0, g(1) = 1. The forward value is the usual
  L_i = 0.5 gamma'(t_i) ||eps_i - eps_hat(z_t, gamma_t)||^2. Reverse-mode derivatives:
    eps_fn's parameters, gamma_0, gamma_1 (and f, eps): d L_i / d .  (unchanged)
    parameters of shape_fn:                            d L_i^2 / d . = 2 L_i dL_i / d .
  E[L] depends on the schedule only through gamma_0, gamma_1 (VDM eq. 20), so the
  shape gradient is that of Var[L] = E[L^2] - E[L]^2 (VDM appendix I.2). For an
  objective sum_i c_i L_i (e.g. a batch mean, c_i = 1/B) one backward pass gives the
  shape parameters the gradient of sum_i c_i L_i^2. Implemented with a custom_vjp
  around the per-example loss (one forward, one backward pass of eps_fn).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_0, gamma_1: schedule endpoints, scalars (e.g. learned parameters).
    shape_fn: t [B] -> g(t) [B], normalised monotone shape in [0, 1].
    f: encoded data, [B, H, W, C].
    t: times in [0, 1], [B].
    eps: noise for z_t, [B, H, W, C].

  Returns:
    diffusion loss, nats per example summed over H, W, C: [B].
  """
  g_t, dg_t = jax.jvp(shape_fn, (t,), (jnp.ones_like(t),))

  def per_example(gamma_0, gamma_1, g_t, dg_t):
    return _diffusion_from_shape(eps_fn, f, eps, gamma_0, gamma_1, g_t, dg_t)

  converted, consts = jax.closure_convert(per_example, gamma_0, gamma_1, g_t, dg_t)
  return _second_moment_for_shape(converted, gamma_0, gamma_1, g_t, dg_t, *consts)


def schedule_from_shape(gamma_0: ArrayLike, gamma_1: ArrayLike, shape_fn: GammaFn) -> GammaFn:
  """gamma_fn(t) = gamma_0 + (gamma_1 - gamma_0) shape_fn(t), the split of variance minimisation.

  Args:
    gamma_0, gamma_1: schedule endpoints, scalars.
    shape_fn: t [B] -> g(t) [B], monotone, g(0) = 0, g(1) = 1.

  Returns:
    gamma_fn mapping t [B] to gamma [B] (VDM appendix I.2).
  """
  return lambda t: gamma_0 + (gamma_1 - gamma_0) * shape_fn(t)


def variance_minimising_vdm_loss_from_noise(eps_fn: EpsFn, gamma_0: ArrayLike, gamma_1: ArrayLike,
                                            shape_fn: GammaFn, x: ArrayLike, t: ArrayLike,
                                            eps: ArrayLike, eps0: ArrayLike, *,
                                            vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""`vdm_loss_from_noise` (continuous time) with the variance-minimising shape gradient.

  Same value as vdm_loss_from_noise(eps_fn, schedule_from_shape(gamma_0, gamma_1, shape_fn),
  x, t, eps, eps0); gradients as in `variance_minimising_diffusion_loss` (prior and
  reconstruction depend on gamma_0, gamma_1 only and keep their ordinary gradient).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat.
    gamma_0, gamma_1: schedule endpoints, scalars.
    shape_fn: t [B] -> g(t) [B], monotone, g(0) = 0, g(1) = 1.
    x: integer data, [B, H, W, C]; t: [B]; eps, eps0: [B, H, W, C].
    vocab_size: number of values V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'}), nats per example.
  """
  losses._check_options(0, vocab_size)
  x, f = losses._check_and_encode(x, t, eps, eps0, vocab_size)
  terms = losses._endpoint_terms(x, f, gamma_0, gamma_1, eps0, vocab_size)
  terms["diffusion"] = variance_minimising_diffusion_loss(eps_fn, gamma_0, gamma_1, shape_fn, f, t,
                                                          eps)
  return losses.bound_from_terms(terms), terms


def variance_minimising_vdm_loss(eps_fn: EpsFn, gamma_0: ArrayLike, gamma_1: ArrayLike,
                                 shape_fn: GammaFn, x: ArrayLike, key: PRNGKey, *,
                                 antithetic: bool = True,
                                 vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""`vdm_loss` (continuous time) whose schedule-shape parameters get d E[L_diff^2].

  Draws eps0, t, eps exactly as `vdm_loss` does (same key, same values) and calls
  `variance_minimising_vdm_loss_from_noise`. Wire a learned schedule as
  gamma(t) = gamma_0 + (gamma_1 - gamma_0) shape_fn(t) with the endpoints and the
  normalised monotone shape as separate parameters.

  Args:
    eps_fn, gamma_0, gamma_1, shape_fn: as in `variance_minimising_vdm_loss_from_noise`.
    x: integer data, [B, H, W, C].
    key: PRNG key.
    antithetic: stratified times.
    vocab_size: number of values V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'}), nats per example.
  """
  t, eps, eps0 = losses.draw_noise(key, jnp.shape(x), antithetic=antithetic)
  return variance_minimising_vdm_loss_from_noise(eps_fn, gamma_0, gamma_1, shape_fn, x, t, eps, eps0,
                                                 vocab_size=vocab_size)
