r"""Closed-form optimal noise predictors for Gaussian-mixture data, and sample distances.

Data x in R^D from sum_k w_k N(mu_k, s_k^2 I). Under q(z_t | x) = N(alpha x, sigma^2 I)
the marginal of z_t is sum_k w_k N(alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2,
and the optimal (MMSE) noise prediction is

  eps_hat(z) = E[eps | z_t = z] = sigma sum_k r_k(z) (z - alpha mu_k) / v_k,
  r_k(z) = softmax_k(log w_k - D/2 log v_k - ||z - alpha mu_k||^2 / (2 v_k)).

For one component this is eps_hat = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2).
Exact answers to test samplers against; used by the sampler tests and
benchmarks/sampling.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax.typing import ArrayLike

from vdm_jax.typing import EpsFn, PRNGKey


def mixture_eps_fn(means: ArrayLike, stds: ArrayLike, weights: ArrayLike) -> EpsFn:
  r"""The optimal eps_hat for x ~ sum_k w_k N(mu_k, s_k^2 I_D).

  Args:
    means: [K, D] component means mu_k.
    stds: [K] component standard deviations s_k > 0.
    weights: [K] mixture weights, summing to 1.

  Returns:
    eps_fn(z [B, D], gamma [B]) -> eps_hat [B, D].
  """
  means = jnp.asarray(means, jnp.float32)
  var_x = jnp.square(jnp.asarray(stds, jnp.float32))
  log_w = jnp.log(jnp.asarray(weights, jnp.float32))
  dim = means.shape[1]

  def eps_fn(z: jax.Array, gamma: ArrayLike) -> jax.Array:
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), z.shape[:1])[:, None]  # [B, 1]
    alpha2, sigma2 = jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)
    v = alpha2 * var_x + sigma2  # [B, K]
    diff = z[:, None, :] - jnp.sqrt(alpha2)[..., None] * means  # [B, K, D]
    logits = log_w - 0.5 * dim * jnp.log(v) - 0.5 * jnp.sum(jnp.square(diff), -1) / v
    resp = jax.nn.softmax(logits, axis=-1)
    return jnp.sqrt(sigma2) * jnp.einsum("bk,bkd->bd", resp / v, diff)

  return eps_fn


def gaussian_eps_fn(mean: float, std: float, dim: int) -> EpsFn:
  """The optimal eps_hat for x ~ N(mean 1_D, std^2 I_D).

    eps_hat(z, gamma) = sigma (z - alpha mean) / (alpha^2 std^2 + sigma^2)

  Args:
    mean: the data mean of every dimension.
    std: the data standard deviation, > 0.
    dim: D.

  Returns:
    eps_fn(z [B, D], gamma [B]) -> eps_hat [B, D].
  """
  return mixture_eps_fn(jnp.full((1, dim), mean), jnp.asarray([std]), jnp.asarray([1.0]))


def sample_mixture(key: PRNGKey, num: int, means: ArrayLike, stds: ArrayLike, weights: ArrayLike,
                   gamma_0: ArrayLike | None = None) -> jax.Array:
  """Exact samples of the data (gamma_0 None) or of z_0 = alpha_0 x + sigma_0 eps.

  Args:
    key: PRNG key.
    num: N, the number of samples.
    means, stds, weights: the mixture, as in `mixture_eps_fn` ([K, D], [K], [K]).
    gamma_0: optional scalar gamma of z_0; None returns the data x itself.

  Returns:
    [N, D] float32 samples.
  """
  means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
  k_comp, k_x, k_eps = jax.random.split(key, 3)
  comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(weights)), shape=(num,))
  x = means[comp] + stds[comp, None] * jax.random.normal(k_x, (num, means.shape[1]))
  if gamma_0 is None:
    return x
  alpha_0, sigma_0 = jnp.sqrt(jax.nn.sigmoid(-gamma_0)), jnp.sqrt(jax.nn.sigmoid(gamma_0))
  return alpha_0 * x + sigma_0 * jax.random.normal(k_eps, x.shape)


def energy_distance(a: npt.ArrayLike, b: npt.ArrayLike, max_points: int = 2000) -> float:
  r"""Energy distance 2 E|A - B| - E|A - A'| - E|B - B'| between two [N, D] sample sets (numpy).

  Szekely & Rizzo 2013; zero iff the distributions agree. Uses the first max_points rows of
  each set (the cost is quadratic); the expectations include the zero diagonal terms.

  Args:
    a, b: [N, D] and [M, D] samples.
    max_points: rows of each set used.

  Returns:
    the distance, a float in the units of the data.
  """
  a = np.asarray(a, np.float64)[:max_points]
  b = np.asarray(b, np.float64)[:max_points]

  def mean_dist(u, v):
    return np.mean(np.linalg.norm(u[:, None, :] - v[None, :, :], axis=-1))

  return 2.0 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def sliced_wasserstein(a: npt.ArrayLike, b: npt.ArrayLike, num_projections: int = 128,
                       seed: int = 0) -> float:
  r"""Sliced 1-Wasserstein distance: mean over random unit directions of W1 of the projections.

    SW1 = mean_k W1(a . u_k, b . u_k),  u_k uniform on the unit sphere (Rabin et al. 2011),
  with W1 of two equal-size 1-D samples the mean absolute difference of their sorted values.

  Args:
    a, b: [N, D] and [M, D] samples (the first min(N, M) rows of each are used).
    num_projections: K directions.
    seed: numpy seed of the directions.

  Returns:
    the distance, a float in the units of the data.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = min(len(a), len(b))
  dirs = np.random.default_rng(seed).normal(size=(num_projections, a.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  pa = np.sort(a[:n] @ dirs.T, axis=0)
  pb = np.sort(b[:n] @ dirs.T, axis=0)
  return float(np.mean(np.abs(pa - pb)))
