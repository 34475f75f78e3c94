"""Type aliases of the public API, defined once (like jax.typing); no logic.

Arrays: functions take `jax.typing.ArrayLike` (jax or numpy arrays, Python scalars) and
return `jax.Array`. The callables passed around the library:

  eps_fn(z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C]   (EpsFn)
  gamma_fn(t [B]) -> gamma [B], increasing in t                   (GammaFn)
  loss_fn(params, batch, key) -> (loss [B] nats, terms)           (LossFn)
"""
from typing import Any, Callable, Sequence

import jax

PRNGKey = jax.Array
"""A JAX PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed))."""

PyTree = Any
"""A nested structure of arrays (dicts, lists, tuples, dataclasses), e.g. model parameters."""

Params = Any
"""Model parameters: the nested dict {"score_model": ..., "gamma": ...} of VDM.init."""

Shape = Sequence[int]
"""An array shape such as (B, H, W, C)."""

Terms = dict[str, jax.Array]
"""Per-example loss terms by name, each [B]: "prior", "reconstruction", "diffusion" in nats
(and metrics such as "bpd" in bits per dimension)."""

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
"""eps_fn(z_t [B, ...], gamma_t [B] or scalar) -> eps_hat [B, ...], the noise prediction."""

CondEpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""cond_eps_fn(z_t [B, ...], gamma_t [B], labels int [B]) -> eps_hat [B, ...]."""

GammaFn = Callable[[jax.Array], jax.Array]
"""gamma_fn(t) -> gamma(t) = -log SNR(t), same shape as t; also any other t -> f(t) map."""

WeightFn = Callable[[jax.Array], jax.Array]
"""w(lambda) of the weighted diffusion loss, lambda = log SNR = -gamma; shape of lambda."""

LossFn = Callable[[Params, dict, PRNGKey], tuple[jax.Array, Terms]]
"""loss_fn(params, batch {"image": int [B, H, W, C], ...}, key) -> (loss [B] nats, terms)."""
