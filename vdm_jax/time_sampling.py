r"""Importance-sampled diffusion times for the continuous-time VDM bound.

The diffusion term is an expectation over t ~ U(0, 1); for any density q(t) > 0 on [0, 1]
  E_{t ~ U(0, 1)}[L(t)] = E_{t ~ q}[L(t) / q(t)],
and the variance of the one-sample estimator L(t) / q(t) is smallest for
  q*(t) = sqrt(E[L(t)^2]) / int_0^1 sqrt(E[L(s)^2]) ds
(Kahn and Marshall 1953; for diffusion models: Nichol and Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models", sec. 3.3; Song et al. 2021, "Maximum Likelihood
Training of Score-Based Diffusion Models", sec. 5; Zheng et al. 2023, i-DODE, sec. 4.3).

Here q is piecewise constant on M equal bins of [0, 1] with bin probabilities p_m:
  q(t) = M p_m for t in [m / M, (m + 1) / M),
  p_m = w / M + (1 - w) sqrt(m2_m) / sum_k sqrt(m2_k),
with m2_m an estimate of E[L(t)^2] on bin m and w > 0 a uniform ("defensive") share that keeps
q > 0 everywhere, so the estimator stays unbiased whatever the estimates are. Within a bin
q is uniform, so the samples that fall in bin m (from any q) give an unbiased estimate of
m2_m; `update_second_moments` keeps such running estimates.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vdm_jax import _numerics
from vdm_jax import losses
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Terms


class TimeProposal(NamedTuple):
  """A piecewise-constant density on [0, 1]: probs [M] of M equal bins (positive, sum 1)."""
  probs: jax.Array


class SecondMoments(NamedTuple):
  """Running per-bin sums of L(t)^2 and sample counts, both [M] (exponentially decayed)."""
  sums: jax.Array
  counts: jax.Array


def _check_num_bins(num_bins):
  if not (_numerics.is_int(num_bins) and num_bins >= 1):
    raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")


def _bin_index(t: jax.Array, num_bins: int) -> jax.Array:
  """m = floor(t M), with t = 1 put in the last bin; int32, shape of t."""
  return jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)


def uniform_proposal(num_bins: int) -> TimeProposal:
  """The uniform density on [0, 1] as a TimeProposal of num_bins bins (p_m = 1 / M)."""
  _check_num_bins(num_bins)
  return TimeProposal(jnp.full((num_bins,), 1.0 / num_bins, jnp.float32))


def proposal_from_second_moments(second_moments: jax.typing.ArrayLike, *,
                                 uniform_weight: float = 0.05) -> TimeProposal:
  r"""The variance-minimising histogram proposal from per-bin estimates of E[L(t)^2].

    p_m = w / M + (1 - w) sqrt(m2_m) / sum_k sqrt(m2_k)     (uniform when all m2_m = 0)

  Args:
    second_moments: m2 [M] >= 0, estimates of E[L(t)^2] (nats^2) on the M equal bins,
      e.g. `second_moment_estimates(state)` or closed-form values.
    uniform_weight: w in (0, 1], the uniform share; every weight 1 / q(t) <= M / w.

  Returns:
    TimeProposal with probs [M] (Nichol and Dhariwal 2021, sec. 3.3; Kahn and Marshall 1953).
  """
  m2 = jnp.asarray(second_moments, jnp.float32)
  if m2.ndim != 1 or m2.shape[0] < 1:
    raise ValueError(f"second_moments must be 1-D [M] with M >= 1, got shape {m2.shape}")
  if not 0.0 < uniform_weight <= 1.0:
    raise ValueError(f"uniform_weight must be in (0, 1] (q > 0 keeps the estimate unbiased), "
                     f"got {uniform_weight!r}")
  root = jnp.sqrt(jnp.maximum(m2, 0.0))
  total = jnp.sum(root)
  shape = jnp.where(total > 0, root / jnp.where(total > 0, total, 1.0), 1.0 / m2.shape[0])
  return TimeProposal(uniform_weight / m2.shape[0] + (1.0 - uniform_weight) * shape)


def init_second_moments(num_bins: int) -> SecondMoments:
  """Empty running estimates (sums and counts zero) for num_bins equal bins of [0, 1]."""
  _check_num_bins(num_bins)
  zeros = jnp.zeros((num_bins,), jnp.float32)
  return SecondMoments(zeros, zeros)


def update_second_moments(state: SecondMoments, t: jax.typing.ArrayLike, loss: jax.typing.ArrayLike,
                          *, decay: float = 1.0) -> SecondMoments:
  r"""Adds samples L(t_i) to the per-bin running estimates of E[L(t)^2].

    sums_m   <- decay sums_m   + sum_{i: t_i in bin m} L(t_i)^2
    counts_m <- decay counts_m + #{i: t_i in bin m}
  decay = 1 gives the exact running mean; decay < 1 forgets old samples as the model trains.

  Args:
    state: SecondMoments with sums, counts [M].
    t: times in [0, 1], [B] (drawn from any proposal: q is uniform within a bin).
    loss: the UNWEIGHTED diffusion loss L(t_i) [B] (nats); from an importance-weighted
      term divide by `importance_weights(proposal, t)`.
    decay: in (0, 1].

  Returns:
    the new SecondMoments.
  """
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"decay must be in (0, 1], got {decay!r}")
  t, loss = jnp.asarray(t, jnp.float32), jnp.asarray(loss, jnp.float32)
  if t.ndim != 1 or loss.shape != t.shape:
    raise ValueError(f"t and loss must both be [B], got {t.shape} and {loss.shape}")
  num_bins = state.sums.shape[0]
  index = _bin_index(t, num_bins)
  sums = jax.ops.segment_sum(jnp.square(loss), index, num_segments=num_bins)
  counts = jax.ops.segment_sum(jnp.ones_like(loss), index, num_segments=num_bins)
  return SecondMoments(decay * state.sums + sums, decay * state.counts + counts)


def second_moment_estimates(state: SecondMoments) -> jax.Array:
  """Per-bin mean of L(t)^2, sums / counts, [M] (nats^2); 0 for bins without samples."""
  return jnp.where(state.counts > 0, state.sums / jnp.where(state.counts > 0, state.counts, 1.0),
                   0.0)


def importance_weights(proposal: TimeProposal, t: jax.typing.ArrayLike) -> jax.Array:
  r"""1 / q(t) = 1 / (M p_m) for t in bin m; E_{t ~ q}[weight] = 1.

  Args:
    proposal: TimeProposal with probs [M].
    t: times in [0, 1], any shape.

  Returns:
    weights, shape of t (dimensionless).
  """
  num_bins = proposal.probs.shape[0]
  return 1.0 / (num_bins * proposal.probs[_bin_index(jnp.asarray(t, jnp.float32), num_bins)])


def quantile(proposal: TimeProposal, u: jax.typing.ArrayLike) -> jax.Array:
  r"""Inverse CDF of the proposal: t with Q(t) = u, so u ~ U(0, 1) gives t ~ q.

  With cumulative edges c_m = sum_{k < m} p_k, u in [c_m, c_{m+1}) maps linearly into bin m:
    t = (m + (u - c_m) / p_m) / M.
  The uniform proposal maps u to itself.

  Args:
    proposal: TimeProposal with probs [M].
    u: uniforms in [0, 1), any shape.

  Returns:
    t in [0, 1], shape of u.
  """
  probs = proposal.probs / jnp.sum(proposal.probs)
  num_bins = probs.shape[0]
  edges = jnp.concatenate([jnp.zeros((1,), probs.dtype), jnp.cumsum(probs)])
  u = jnp.asarray(u, jnp.float32)
  m = jnp.clip(jnp.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
  frac = jnp.clip((u - edges[m]) / probs[m], 0.0, 1.0)
  return (m + frac) / num_bins


def sample_times(proposal: TimeProposal, key: PRNGKey, batch_size: int, *,
                 antithetic: bool = True) -> tuple[jax.Array, jax.Array]:
  r"""t ~ q and the importance weights 1 / q(t).

  u = losses.sample_times(key, B, antithetic=antithetic) (stratified u_i = mod(u_0 + i / B, 1)
  when antithetic, so the t_i are stratified in q's quantiles), t = quantile(proposal, u).

  Args:
    proposal: TimeProposal.
    key: PRNG key.
    batch_size: B.
    antithetic: stratified uniforms (VDM appendix I.1).

  Returns:
    (t [B] in [0, 1], weights [B]).
  """
  t = quantile(proposal, losses.sample_times(key, batch_size, antithetic=antithetic))
  return t, importance_weights(proposal, t)


def vdm_loss_from_noise(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.typing.ArrayLike,
                        t: jax.typing.ArrayLike, eps: jax.typing.ArrayLike,
                        eps0: jax.typing.ArrayLike, proposal: TimeProposal, *,
                        vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""The continuous-time VDM bound with the diffusion term reweighted for t ~ q.

    diffusion = 0.5 gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2 / q(t),
  an unbiased estimate of the diffusion term when t ~ q (prior and reconstruction as in
  losses.vdm_loss_from_noise; Kingma et al. 2021, eq. 17).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_fn: t [B] -> gamma [B].
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    t: times drawn from proposal, [B].
    eps, eps0: noises for z_t and z_0, [B, H, W, C].
    proposal: the TimeProposal t was drawn from.
    vocab_size: V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'} each [B]), nats per example
    summed over H, W, C; the unweighted diffusion loss is terms['diffusion'] / weights.
  """
  _, terms = losses.vdm_loss_from_noise(eps_fn, gamma_fn, x, t, eps, eps0, num_steps=0,
                                        vocab_size=vocab_size)
  terms["diffusion"] = terms["diffusion"] * importance_weights(proposal, t)
  return losses.bound_from_terms(terms), terms


def vdm_loss(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.typing.ArrayLike, key: PRNGKey,
             proposal: TimeProposal, *, antithetic: bool = True,
             vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""One-sample estimate of the VDM bound with importance-sampled times t ~ q.

  Draws (u, eps, eps0) = losses.draw_noise(key, x.shape, antithetic=antithetic) exactly as
  losses.vdm_loss does, maps t = quantile(proposal, u) and calls `vdm_loss_from_noise`;
  with the uniform proposal it is losses.vdm_loss (continuous time).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C].
    gamma_fn: t [B] -> gamma [B], increasing.
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    key: PRNG key.
    proposal: TimeProposal.
    antithetic: stratified uniforms.
    vocab_size: V.

  Returns:
    (loss [B], terms {'prior', 'reconstruction', 'diffusion'}), nats per example summed over
    H, W, C; E[loss] is the bound of losses.vdm_loss, with lower variance for a good q.
  """
  u, eps, eps0 = losses.draw_noise(key, jnp.shape(x), antithetic=antithetic)
  return vdm_loss_from_noise(eps_fn, gamma_fn, x, quantile(proposal, u), eps, eps0, proposal,
                             vocab_size=vocab_size)
