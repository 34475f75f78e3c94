r"""Classifier-free guidance, and image editing through the encoders: reconstruction
from a partially noised image (SDEdit-like) and interpolation between two images.

`eps_fn(z_t, gamma_t)` maps z [B, ...] and gamma [B] to eps_hat [B, ...];
`gamma_fn(t)` maps [B] to [B]. Images enter as encoded data f in [-1, 1]
(vdm_jax.decoders.encode(x)) and leave as latents z_0 (decode with
vdm_jax.sampling.to_data).
"""
import jax
import jax.numpy as jnp

from vdm_jax import gaussian
from vdm_jax import ode
from vdm_jax import sampling


def classifier_free_guidance(cond_eps_fn, labels, null_label, weight):
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

  def eps_fn(z_t, gamma_t):
    batch = z_t.shape[0]
    if batch != labels.shape[0]:
      raise ValueError(f"z_t has batch {batch} but {labels.shape[0]} labels were bound")
    gamma = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (batch,))
    eps = cond_eps_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([gamma, gamma]),
                      jnp.concatenate([labels, null]))
    eps_c, eps_null = eps[:batch], eps[batch:]
    return eps_c + weight * (eps_c - eps_null)

  return eps_fn


def _encode(eps_fn, gamma_fn, f, key, t, num_steps):
  """z_t from images f [B, ...]: q(z_t | x) sample with `key`, or the DDIM encoder from alpha_0 f."""
  if key is not None:
    gamma_t = ode.gamma_at(gamma_fn, t, f.shape[0])
    return gaussian.sample_forward(f, gamma_t, jax.random.normal(key, f.shape, jnp.float32))
  z_0, _ = gaussian.forward_marginal(f, ode.gamma_at(gamma_fn, 0.0, f.shape[0]))
  return sampling.ddim_encode(eps_fn, gamma_fn, z_0, t_end=t, num_steps=num_steps)


def _check_t(t):
  if not 0.0 < t <= 1.0:
    raise ValueError(f"t must be in (0, 1], got {t!r}")


def reconstruct(eps_fn, gamma_fn, f, *, t, num_steps=50, key=None):
  r"""Encodes images to time t and decodes them back with DDIM (eta = 0).

  Encoder: with `key`, the stochastic one z_t = alpha_t f + sigma_t eps,
  eps = normal(key) (SDEdit, Meng et al. 2022: partial noising from t); without,
  the deterministic DDIM encoder from z_0 = alpha_0 f. Decoder: `ddim_decode`
  from t to 0 with num_steps steps. Small t keeps the image, t = 1 forgets it.

  Args:
    eps_fn, gamma_fn: the model.
    f: encoded images, [B, H, W, C].
    t: time in (0, 1] to noise to.
    num_steps: DDIM steps of the encoder and the decoder.
    key: optional PRNG key (stochastic encoder).

  Returns:
    z_0, [B, H, W, C].
  """
  _check_t(t)
  f = jnp.asarray(f, jnp.float32)
  z_t = _encode(eps_fn, gamma_fn, f, key, t, num_steps)
  return sampling.ddim_decode(eps_fn, gamma_fn, z_t, t_start=t, num_steps=num_steps)


def slerp(z_a, z_b, lam):
  r"""Spherical interpolation sin((1 - l) theta) / sin(theta) z_a + sin(l theta) / sin(theta) z_b.

  theta is the angle between the flattened z_a and z_b; l = 0 and 1 return
  z_a and z_b exactly; falls back to linear interpolation when theta ~ 0.

  Args:
    z_a, z_b: arrays of one shape S.
    lam: [L] interpolation weights.

  Returns:
    [L, *S].
  """
  lam = jnp.asarray(lam, jnp.float32).reshape((-1,) + (1,) * z_a.ndim)
  cos = jnp.vdot(z_a, z_b) / (jnp.linalg.norm(z_a) * jnp.linalg.norm(z_b))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  small = theta < 1e-4
  sin_theta = jnp.where(small, 1.0, jnp.sin(theta))
  w_a = jnp.where(small, 1.0 - lam, jnp.sin((1.0 - lam) * theta) / sin_theta)
  w_b = jnp.where(small, lam, jnp.sin(lam * theta) / sin_theta)
  return w_a * z_a + w_b * z_b


def interpolate(eps_fn, gamma_fn, f_a, f_b, lambdas, *, t=0.8, num_steps=50, key=None):
  r"""Interpolates two images through their latents at time t (DDIM paper, sec. 5.4).

  Both images are encoded to z_t as in `reconstruct` (stochastic encoder with
  keys fold_in(key, 0) for f_a and fold_in(key, 1) for f_b when key is given,
  else the DDIM encoder), the latents are slerp-ed, and each mixture is decoded
  with `ddim_decode`. lambda = 0 and 1 reproduce reconstruct(f_a) and reconstruct(f_b)
  with the same keys.

  Args:
    eps_fn, gamma_fn: the model.
    f_a, f_b: encoded images, [H, W, C] each.
    lambdas: [L] weights in [0, 1].
    t: time in (0, 1] of the latents.
    num_steps: DDIM steps of the encoder and the decoder.
    key: optional PRNG key.

  Returns:
    z_0, [L, H, W, C].
  """
  _check_t(t)
  f_a, f_b = jnp.asarray(f_a, jnp.float32), jnp.asarray(f_b, jnp.float32)
  if f_a.shape != f_b.shape:
    raise ValueError(f"f_a and f_b must have one shape, got {f_a.shape} and {f_b.shape}")
  if key is None:
    z_a, z_b = _encode(eps_fn, gamma_fn, jnp.stack([f_a, f_b]), None, t, num_steps)
  else:
    z_a = _encode(eps_fn, gamma_fn, f_a[None], jax.random.fold_in(key, 0), t, num_steps)[0]
    z_b = _encode(eps_fn, gamma_fn, f_b[None], jax.random.fold_in(key, 1), t, num_steps)[0]
  z_t = slerp(z_a, z_b, lambdas)
  return sampling.ddim_decode(eps_fn, gamma_fn, z_t, t_start=t, num_steps=num_steps)
