r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1 / 3 / 5): ancestral predictor,
Langevin corrector at fixed gamma with a target signal-to-noise ratio."""
import jax
import jax.numpy as jnp

from vdm_jax import _numerics
from vdm_jax import gaussian
from vdm_jax import schedules
from vdm_jax.sampling import ancestral
from vdm_jax.sampling import grid
from vdm_jax.typing import EpsFn, GammaFn, PRNGKey, Shape


def _langevin(eps_fn, z, gamma, key, num_corrector_steps, snr):
  r"""Langevin corrector at fixed gamma (Song et al. 2021, Alg. 5).

  score = -eps_hat / sigma; step = 2 (snr ||noise|| / ||score||)^2 with norms
  averaged over the batch; z <- z + step score + sqrt(2 step) noise.
  """
  sigma = schedules.sigma(gaussian.broadcast_to_data(gamma, z.ndim))

  def norm(v):
    return jnp.mean(jnp.sqrt(_numerics.sum_per_example(jnp.square(v))))

  def body(j, z):
    score = -eps_fn(z, gamma) / sigma
    noise = jax.random.normal(jax.random.fold_in(key, j), z.shape, jnp.float32)
    step = 2.0 * jnp.square(snr * norm(noise) / norm(score))
    return z + step * score + jnp.sqrt(2.0 * step) * noise

  return jax.lax.fori_loop(0, num_corrector_steps, body, z)


def pc_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: PRNGKey, shape: Shape, *,
              num_steps: int = 1000, corrector_steps: int = 1, snr: float = 0.16,
              predictor: str = "ancestral") -> jax.Array:
  r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1 / 3 / 5).

  Each step i: the predictor moves t -> s (an `ancestral_step`, or nothing when
  predictor="none", which gives annealed Langevin dynamics on the grid), then
  `corrector_steps` Langevin steps at s with score -eps_hat / sigma_s and the
  step size set by the target signal-to-noise ratio `snr`.

  Args:
    eps_fn, gamma_fn, key, shape: as in `ancestral_sample`.
    num_steps: N grid intervals; network calls N (1 + corrector_steps).
    corrector_steps: Langevin steps per grid point, >= 0.
    snr: target signal-to-noise ratio r > 0 of the Langevin step.
    predictor: "ancestral" or "none".

  Returns:
    z_0, float32 of `shape`.
  """
  shape = grid.check_shape(shape)
  if predictor not in ("ancestral", "none"):
    raise ValueError(f"predictor must be 'ancestral' or 'none', got {predictor!r}")
  if not (isinstance(corrector_steps, int) and corrector_steps >= 0) or not snr > 0:
    raise ValueError(f"need corrector_steps int >= 0 and snr > 0, got {corrector_steps!r}, {snr!r}")
  times = grid.time_grid(num_steps)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape, jnp.float32)

  def body(i, z):
    key_p, key_c = jax.random.split(jax.random.fold_in(key_steps, i))
    gamma_t = grid.gamma_at(gamma_fn, times[i], shape[0])
    gamma_s = grid.gamma_at(gamma_fn, times[i + 1], shape[0])
    if predictor == "ancestral":
      noise = jax.random.normal(key_p, shape, jnp.float32)
      z = ancestral.ancestral_update(z, eps_fn(z, gamma_t), gamma_t, gamma_s, noise, "posterior")
    return _langevin(eps_fn, z, gamma_s, key_c, corrector_steps, snr)

  return jax.lax.fori_loop(0, num_steps, body, z)
