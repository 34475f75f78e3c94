r"""L_simple, x0- / v-prediction, and the weighted-loss family of Kingma & Gao (2023).

With lambda = log SNR = -gamma, the weighted diffusion loss of Kingma & Gao,
"Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation" is
  L_w(x) = 0.5 E_{t ~ U(0,1), eps} [ w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2 ]
         = 0.5 E_t [ w(-gamma_t) gamma'(t) ||eps - eps_hat||^2 ];
w = 1 is the VDM continuous-time diffusion loss. Losses are nats-like per example
summed over H, W, C, shape [B]. Prediction conversions use alpha_t^2 = sigmoid(-gamma_t),
sigma_t^2 = sigmoid(gamma_t) and z_t = alpha_t x + sigma_t eps (x is the encoded data).
"""
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax.typing import EpsFn, GammaFn, WeightFn


def _alpha_sigma(gamma, ndim):
  return schedules.alpha_sigma(gaussian.broadcast_to_data(gamma, ndim))


def eps_to_x0(z_t: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  r"""x0_hat = (z_t - sigma_t eps_hat) / alpha_t, the data prediction implied by eps_hat.

  Inverts z_t = alpha_t x + sigma_t eps (Ho et al. 2020; Kingma et al. 2021).

  Args:
    z_t: latent, [B, H, W, C].
    eps_hat: noise prediction, [B, H, W, C].
    gamma_t: gamma at t, scalar or [B].

  Returns:
    x0_hat in the encoded data scale, [B, H, W, C].
  """
  alpha, sigma = _alpha_sigma(gamma_t, jnp.ndim(z_t))
  return (z_t - sigma * eps_hat) / alpha


def x0_to_eps(z_t: ArrayLike, x0_hat: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  r"""eps_hat = (z_t - alpha_t x0_hat) / sigma_t. Shapes [B, H, W, C]; gamma_t scalar or [B]."""
  alpha, sigma = _alpha_sigma(gamma_t, jnp.ndim(z_t))
  return (z_t - alpha * x0_hat) / sigma


def velocity(x0: ArrayLike, eps: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  r"""The v-prediction target v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022). Shapes [B, H, W, C]."""
  alpha, sigma = _alpha_sigma(gamma_t, jnp.ndim(x0))
  return alpha * eps - sigma * x0


def v_to_eps(z_t: ArrayLike, v_hat: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  r"""eps_hat = sigma_t z_t + alpha_t v_hat. Shapes [B, H, W, C]; gamma_t scalar or [B]."""
  alpha, sigma = _alpha_sigma(gamma_t, jnp.ndim(z_t))
  return sigma * z_t + alpha * v_hat


def v_to_x0(z_t: ArrayLike, v_hat: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  r"""x0_hat = alpha_t z_t - sigma_t v_hat. Shapes [B, H, W, C]; gamma_t scalar or [B]."""
  alpha, sigma = _alpha_sigma(gamma_t, jnp.ndim(z_t))
  return alpha * z_t - sigma * v_hat


def as_eps_fn(pred_fn: EpsFn, parameterization: str) -> EpsFn:
  r"""Wraps an x0- or v-predicting network as an eps_fn(z_t, gamma_t) for the VDM losses.

  Since ||x0 - x0_hat||^2 = exp(gamma) ||eps - eps_hat||^2 and ||v - v_hat||^2 =
  (1 + exp(gamma)) ||eps - eps_hat||^2, any parameterization can be trained with the
  eps-form bound; only the implied weighting of a plain MSE differs.

  Args:
    pred_fn: (z_t [B, H, W, C], gamma_t [B]) -> prediction [B, H, W, C].
    parameterization: "eps", "x0" or "v".

  Returns:
    eps_fn: (z_t, gamma_t) -> eps_hat.
  """
  convert = {"eps": lambda z, p, g: p, "x0": x0_to_eps, "v": v_to_eps}
  if parameterization not in convert:
    raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
  return lambda z_t, gamma_t: convert[parameterization](z_t, pred_fn(z_t, gamma_t), gamma_t)


def simple_loss(target: ArrayLike, prediction: ArrayLike, *, kind: str = "mse",
                huber_delta: float = 1.0) -> jax.Array:
  r"""L_simple-style regression loss (Ho et al. 2020, eq. 14), summed per example.

    mse:   sum_i (target_i - prediction_i)^2
    l1:    sum_i |target_i - prediction_i|
    huber: sum_i huber_delta(target_i - prediction_i),  0.5 r^2 if |r| <= delta else delta (|r| - 0.5 delta)
  Ho et al. average over dimensions; divide by D = H*W*C for that scale. With eps
  targets this is unweighted in t (not a bound); use x0 or v targets for those
  parameterizations.

  Args:
    target: eps, x0 or v, [B, H, W, C].
    prediction: the network's output, same shape.
    kind: "mse", "l1" or "huber".
    huber_delta: delta > 0 of the Huber loss.

  Returns:
    loss per example summed over H, W, C: [B].
  """
  target, prediction = jnp.asarray(target), jnp.asarray(prediction)
  if target.shape != prediction.shape or target.ndim < 1:
    raise ValueError(f"target and prediction must have the same shape [B, ...], got {target.shape}, {prediction.shape}")
  r = target - prediction
  if kind == "mse":
    per_dim = jnp.square(r)
  elif kind == "l1":
    per_dim = jnp.abs(r)
  elif kind == "huber":
    if not huber_delta > 0:
      raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    abs_r = jnp.abs(r)
    per_dim = jnp.where(abs_r <= huber_delta, 0.5 * jnp.square(r), huber_delta * (abs_r - 0.5 * huber_delta))
  else:
    raise ValueError(f"kind must be 'mse', 'l1' or 'huber', got {kind!r}")
  return _numerics.sum_per_example(per_dim)


def elbo_weight(lam: ArrayLike) -> jax.Array:
  r"""w(lambda) = 1: the weighted loss is the VDM diffusion loss (the ELBO); shape of lam."""
  return jnp.ones_like(jnp.asarray(lam, jnp.float32))


def eps_mse_weight(lam: ArrayLike) -> jax.Array:
  r"""w(lambda) = sech(lambda / 2) / (2 pi): L_simple's implied weighting under the cosine schedule.

  For gamma(t) = 2 log tan(pi t / 2), gamma'(t) = 2 pi / sin(pi t) and sech(lambda/2) =
  sin(pi t), so 0.5 w gamma' ||eps - eps_hat||^2 = 0.5 ||eps - eps_hat||^2 (Kingma & Gao, table 1).
  Returns w with the shape of lam (lambda = log SNR).
  """
  lam = jnp.asarray(lam)
  # sech(x) = 2 exp(-|x|) / (1 + exp(-2|x|)), finite for any x.
  a = jnp.abs(0.5 * lam)
  return 2.0 * jnp.exp(-a) / (1.0 + jnp.exp(-2.0 * a)) / (2.0 * math.pi)


def sigmoid_weight(lam: ArrayLike, *, shift: float = 0.0) -> jax.Array:
  r"""w(lambda) = sigmoid(shift - lambda), monotone in gamma (Kingma & Gao, sec. 5).

  Returns w with the shape of lam (lambda = log SNR).
  """
  return jax.nn.sigmoid(shift - jnp.asarray(lam))


def edm_weight(lam: ArrayLike, *, p_mean: float = -1.2, p_std: float = 1.2,
               sigma_data: float = 0.5) -> jax.Array:
  r"""EDM weighting (Karras et al. 2022) as a function of lambda (Kingma & Gao, table 1).

    w(lambda) = N(lambda; -2 p_mean, (2 p_std)^2) (exp(-lambda) + sigma_data^2) / sigma_data^2
  Returns w with the shape of lam (lambda = log SNR).
  """
  lam = jnp.asarray(lam)
  mu, std = -2.0 * p_mean, 2.0 * p_std
  density = jnp.exp(-0.5 * jnp.square((lam - mu) / std)) / (std * math.sqrt(2.0 * math.pi))
  return density * (jnp.exp(-lam) + sigma_data**2) / sigma_data**2


def min_snr_weight(lam: ArrayLike, *, snr_gamma: float = 5.0) -> jax.Array:
  r"""Min-SNR-gamma (Hang et al. 2023) on top of the cosine eps-MSE weighting.

    w(lambda) = eps_mse_weight(lambda) min(1, snr_gamma / SNR),  SNR = exp(lambda)
  i.e. per-t eps-MSE weights min(SNR, snr_gamma) / SNR under the cosine schedule.
  Returns w with the shape of lam (lambda = log SNR).
  """
  lam = jnp.asarray(lam)
  return eps_mse_weight(lam) * jnp.minimum(1.0, snr_gamma * jnp.exp(-lam))


WEIGHTINGS: dict[str, WeightFn] = {
    "elbo": elbo_weight,
    "eps_mse": eps_mse_weight,
    "sigmoid": sigmoid_weight,
    "edm": edm_weight,
    "min_snr": min_snr_weight,
}


def weighted_diffusion_loss(eps: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike,
                            dgamma_dt: ArrayLike, weight_fn: WeightFn) -> jax.Array:
  r"""One-sample weighted diffusion loss 0.5 w(-gamma_t) gamma'(t) ||eps - eps_hat||^2.

  Kingma & Gao 2023, written in gamma = -lambda (see the module docstring).

  Args:
    eps: noise used to form z_t, [B, H, W, C].
    eps_hat: prediction, [B, H, W, C].
    gamma_t: gamma(t), [B].
    dgamma_dt: gamma'(t), [B].
    weight_fn: w(lambda), e.g. one of WEIGHTINGS (bind options with functools.partial).

  Returns:
    weighted loss per example summed over H, W, C: [B] (nats for w = 1).
  """
  return weight_fn(-jnp.asarray(gamma_t)) * losses.diffusion_loss(eps, eps_hat, dgamma_dt)


def weighted_diffusion_loss_from_noise(eps_fn: EpsFn, gamma_fn: GammaFn, f: ArrayLike, t: ArrayLike,
                                       eps: ArrayLike, *,
                                       weight_fn: WeightFn = elbo_weight) -> jax.Array:
  r"""Weighted diffusion loss at given t and eps: forms z_t, eps_hat and gamma' (jax.jvp).

  Args:
    eps_fn: (z_t [B, H, W, C], gamma_t [B]) -> eps_hat.
    gamma_fn: t [B] -> gamma [B].
    f: encoded (continuous) data, [B, H, W, C].
    t: times in [0, 1], [B].
    eps: noise, [B, H, W, C].
    weight_fn: w(lambda); the default gives the ELBO (VDM diffusion loss).

  Returns:
    weighted loss per example summed over H, W, C: [B].
  """
  eps_hat, gamma_t, dgamma_dt = losses.eps_prediction(eps_fn, gamma_fn, f, t, eps)
  return weighted_diffusion_loss(eps, eps_hat, gamma_t, dgamma_dt, weight_fn)
