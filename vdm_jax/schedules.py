"""Noise schedules gamma(t) = -log SNR(t) and the alpha / sigma / SNR helpers.

Conventions (Kingma et al. 2021, "Variational Diffusion Models"):
  gamma(t) = -log SNR(t) = log(sigma_t^2 / alpha_t^2), increasing in t in [0, 1];
  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t))  (variance preserving).

A schedule is a plain function `gamma_fn(t)` that maps an array of times of any
shape to gamma of the same shape; the factories below return such functions.
"""
import jax
import jax.numpy as jnp


def fixed_linear(gamma_min=-13.3, gamma_max=5.0):
  r"""The VDM fixed linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t.

  Args:
    gamma_min: gamma(0) (float, nats of -log SNR).
    gamma_max: gamma(1); must be > gamma_min.

  Returns:
    gamma_fn mapping t (any shape, in [0, 1]) to gamma(t) of the same shape.
  """
  if not gamma_max > gamma_min:
    raise ValueError(f"fixed_linear expects gamma_max > gamma_min, got {gamma_min=}, {gamma_max=}")

  def gamma_fn(t):
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    return gamma_min + (gamma_max - gamma_min) * t

  return gamma_fn


def alpha_sigma(gamma):
  r"""Signal and noise scales for a given gamma = -log SNR.

    alpha = sqrt(sigmoid(-gamma)),  sigma = sqrt(sigmoid(gamma)),  alpha^2 + sigma^2 = 1.

  Args:
    gamma: array of any shape.

  Returns:
    (alpha, sigma), each with the shape of gamma.
  """
  gamma = jnp.asarray(gamma)
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def alpha(gamma):
  """alpha = sqrt(sigmoid(-gamma)), the signal scale; shape of gamma."""
  return jnp.sqrt(jax.nn.sigmoid(-jnp.asarray(gamma)))


def sigma(gamma):
  """sigma = sqrt(sigmoid(gamma)), the noise scale; shape of gamma."""
  return jnp.sqrt(jax.nn.sigmoid(jnp.asarray(gamma)))


def snr(gamma):
  """Signal-to-noise ratio alpha^2 / sigma^2 = exp(-gamma); shape of gamma."""
  return jnp.exp(-jnp.asarray(gamma))


def log_snr(gamma):
  """log SNR = lambda = -gamma; shape of gamma."""
  return -jnp.asarray(gamma)
