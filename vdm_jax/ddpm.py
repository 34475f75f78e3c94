r"""The exact DDPM variational bound (Ho et al. 2020, eq. 5) for evaluation.

  L = L_T + sum_{i=2}^T L_{i-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))
    L_{i-1} = E_q KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))
    L_0     = E_q [-log p(x_0 | x_1)]  (discretised Gaussian decoder, vocab_size bins)
with x_0 = x / 127.5 - 1 (decoders.ddpm_encode), alphabar_i and gamma_i = log(1/alphabar_i - 1)
from the betas (schedules.gammas_from_betas) and
  p(x_{i-1} | x_i) = N(mu_tilde(x_i, x0_hat), sigma_i^2),  x0_hat = (x_i - sigma_i eps_hat) / alpha_i,
  sigma_i^2 = beta-tilde_i ("small") or beta_i ("large"); the decoder's variance is
  beta-tilde_2 in both cases (as in Ho et al.'s code), beta_1 when T = 1.
`eps_fn(z, gamma)` receives gamma_i (map it to the integer step if the network wants one).
Every term is nats per example summed over H, W, C, shape [B].
"""
import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax import weighted_losses
from vdm_jax.typing import EpsFn, PRNGKey, Terms


def _tables(betas, variance):
  """float32 tables over i = 1..T: gamma_i, log model variance, decoder log variance."""
  if variance not in ("small", "large"):
    raise ValueError(f"variance must be 'small' (beta-tilde) or 'large' (beta), got {variance!r}")
  betas = np.asarray(betas, np.float64)
  gammas = schedules.gammas_from_betas(betas)
  one_minus_abar = 1.0 / (1.0 + np.exp(-gammas))  # sigmoid(gamma_i) = 1 - alphabar_i
  prev = np.concatenate([[0.0], one_minus_abar[:-1]])
  beta_tilde = betas * prev / one_minus_abar
  model_var = beta_tilde if variance == "small" else betas
  decoder_var = beta_tilde[1] if betas.size > 1 else betas[0]
  model_log_var = np.log(np.where(np.arange(betas.size) == 0, decoder_var, model_var))
  return jnp.asarray(gammas, jnp.float32), jnp.asarray(model_log_var, jnp.float32)


def _kl_term(eps_fn, gammas, model_log_var, f, step, eps):
  """L_{i-1} for steps i = step >= 2 ([B] int, 1-based); [B] nats."""
  gamma_t = gammas[step - 1]
  gamma_s = gammas[jnp.maximum(step - 2, 0)]
  z_t = gaussian.sample_forward(f, gamma_t, eps)
  x0_hat = weighted_losses.eps_to_x0(z_t, eps_fn(z_t, gamma_t), gamma_t)
  mean_q, var_q = gaussian.posterior(z_t, f, gamma_s, gamma_t)
  mean_p, _ = gaussian.posterior(z_t, x0_hat, gamma_s, gamma_t)
  var_p = jnp.exp(gaussian.broadcast_to_data(model_log_var[step - 1], f.ndim))
  return _numerics.sum_per_example(gaussian.kl_normal(mean_q, var_q, mean_p, var_p))


def _decoder_term(eps_fn, gammas, model_log_var, x, f, eps, vocab_size):
  """L_0 = -log p(x | x_1) with the discretised Gaussian at x0_hat; [B] nats."""
  gamma_1 = jnp.broadcast_to(gammas[0], f.shape[:1])
  z_1 = gaussian.sample_forward(f, gamma_1, eps)
  x0_hat = weighted_losses.eps_to_x0(z_1, eps_fn(z_1, gamma_1), gamma_1)  # = mu_theta(x_1, 1): alphabar_0 = 1
  return -decoders.discretized_gaussian_log_likelihood(x, x0_hat, 0.5 * model_log_var[0], vocab_size)


def _check(x, vocab_size):
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"x must be [B, ...] with at least 2 axes, got shape {x.shape}")
  return x, decoders.ddpm_encode(x, vocab_size)


def ddpm_bound(eps_fn: EpsFn, betas: npt.ArrayLike, x: ArrayLike, key: PRNGKey, *,
               variance: str = "small", vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""The DDPM bound summed over all T steps (one x_i sample per step and example).

    L = L_T + sum_{i=2}^T L_{i-1} + L_0    (Ho et al. 2020, eq. 5; see the module docstring)

  Args:
    eps_fn: (z [B, H, W, C], gamma [B]) -> eps_hat.
    betas: [T] numpy array in (0, 1) (see schedules.ddpm_betas).
    x: integer data in {0, ..., V-1}, [B, H, W, C].
    key: PRNG key (step i uses fold_in(key, i)).
    variance: "small" (sigma_i^2 = beta-tilde_i) or "large" (sigma_i^2 = beta_i).
    vocab_size: number of values V.

  Returns:
    (loss [B], terms {'prior': L_T, 'reconstruction': L_0, 'diffusion': sum_{i>=2} L_{i-1}}),
    nats per example summed over H, W, C; unbiased for the bound, exact in the sum over t.
  """
  x, f = _check(x, vocab_size)
  gammas, model_log_var = _tables(betas, variance)
  num_steps = gammas.shape[0]
  noise = lambda i: jax.random.normal(jax.random.fold_in(key, i), f.shape)

  def step(total, i):
    return total + _kl_term(eps_fn, gammas, model_log_var, f, jnp.full(f.shape[:1], i), noise(i)), None

  diffusion, _ = jax.lax.scan(step, jnp.zeros(f.shape[:1]), jnp.arange(2, num_steps + 1))
  terms = {
      "prior": losses.prior_loss(f, gammas[-1]),
      "reconstruction": _decoder_term(eps_fn, gammas, model_log_var, x, f, noise(1), vocab_size),
      "diffusion": diffusion,
  }
  return terms["prior"] + terms["reconstruction"] + terms["diffusion"], terms


def ddpm_step_loss(eps_fn: EpsFn, betas: npt.ArrayLike, x: ArrayLike, step: ArrayLike,
                   eps: ArrayLike, *,
                   variance: str = "small", vocab_size: int = 256) -> jax.Array:
  r"""One term of the DDPM bound at given steps and noise: L_{i-1} for i = step.

  step = 1 gives L_0 (decoder), step >= 2 the KL L_{i-1} at x_i = alpha_i x_0 + sigma_i eps.
  With variance="small", L_{i-1} = 0.5 expm1(gamma_i - gamma_{i-1}) ||eps - eps_hat||^2,
  the VDM discrete-time term.

  Args:
    eps_fn, betas, x, variance, vocab_size: as in `ddpm_bound`.
    step: int steps in {1, ..., T}, [B].
    eps: noise for x_i, [B, H, W, C].

  Returns:
    nats per example summed over H, W, C: [B].
  """
  x, f = _check(x, vocab_size)
  gammas, model_log_var = _tables(betas, variance)
  step = jnp.asarray(step, jnp.int32)
  kl = _kl_term(eps_fn, gammas, model_log_var, f, jnp.maximum(step, 2), eps)
  decoder = _decoder_term(eps_fn, gammas, model_log_var, x, f, eps, vocab_size)
  return jnp.where(step == 1, decoder, kl)


def ddpm_bound_one_step(eps_fn: EpsFn, betas: npt.ArrayLike, x: ArrayLike, key: PRNGKey, *,
                        variance: str = "small", vocab_size: int = 256) -> jax.Array:
  r"""Unbiased one-step estimate of the DDPM bound: L_T + T L_{i-1}, i ~ U{1, ..., T}.

  Args:
    eps_fn, betas, x, variance, vocab_size: as in `ddpm_bound`.
    key: PRNG key (split into the step and the noise).

  Returns:
    nats per example summed over H, W, C: [B].
  """
  x, f = _check(x, vocab_size)
  num_steps = len(betas)
  key_step, key_eps = jax.random.split(key)
  step = jax.random.randint(key_step, f.shape[:1], 1, num_steps + 1)
  eps = jax.random.normal(key_eps, f.shape)
  gammas, _ = _tables(betas, variance)
  return losses.prior_loss(f, gammas[-1]) + num_steps * ddpm_step_loss(
      eps_fn, betas, x, step, eps, variance=variance, vocab_size=vocab_size)
