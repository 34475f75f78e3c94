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


def mixture_eps_fn(means, stds, weights):
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

  def eps_fn(z, gamma):
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), z.shape[:1])[:, None]  # [B, 1]
    alpha2, sigma2 = jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)
    v = alpha2 * var_x + sigma2  # [B, K]
    diff = z[:, None, :] - jnp.sqrt(alpha2)[..., None] * means  # [B, K, D]
    logits = log_w - 0.5 * dim * jnp.log(v) - 0.5 * jnp.sum(jnp.square(diff), -1) / v
    resp = jax.nn.softmax(logits, axis=-1)
    return jnp.sqrt(sigma2) * jnp.einsum("bk,bkd->bd", resp / v, diff)

  return eps_fn


def gaussian_eps_fn(mean, std, dim):
  """The optimal eps_hat for x ~ N(mean 1_D, std^2 I_D): sigma (z - alpha mean) / (alpha^2 std^2 + sigma^2)."""
  return mixture_eps_fn(jnp.full((1, dim), mean), jnp.asarray([std]), jnp.asarray([1.0]))


def sample_mixture(key, num, means, stds, weights, gamma_0=None):
  """Exact samples of the data (gamma_0 None) or of z_0 = alpha_0 x + sigma_0 eps; [num, D]."""
  means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
  k_comp, k_x, k_eps = jax.random.split(key, 3)
  comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(weights)), shape=(num,))
  x = means[comp] + stds[comp, None] * jax.random.normal(k_x, (num, means.shape[1]))
  if gamma_0 is None:
    return x
  alpha_0, sigma_0 = jnp.sqrt(jax.nn.sigmoid(-gamma_0)), jnp.sqrt(jax.nn.sigmoid(gamma_0))
  return alpha_0 * x + sigma_0 * jax.random.normal(k_eps, x.shape)


def energy_distance(a, b, max_points=2000):
  r"""Energy distance 2 E|A - B| - E|A - A'| - E|B - B'| between two [N, D] sample sets (numpy)."""
  a = np.asarray(a, np.float64)[:max_points]
  b = np.asarray(b, np.float64)[:max_points]

  def mean_dist(u, v):
    return np.mean(np.linalg.norm(u[:, None, :] - v[None, :, :], axis=-1))

  return 2.0 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def sliced_wasserstein(a, b, num_projections=128, seed=0):
  r"""Sliced 1-Wasserstein distance: mean over random unit directions of W1 of the projections."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = min(len(a), len(b))
  dirs = np.random.default_rng(seed).normal(size=(num_projections, a.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  pa = np.sort(a[:n] @ dirs.T, axis=0)
  pb = np.sort(b[:n] @ dirs.T, axis=0)
  return float(np.mean(np.abs(pa - pb)))
