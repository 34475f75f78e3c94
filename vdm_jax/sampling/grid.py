r"""Time grids and input checks shared by every sampler.

Step i of N goes from t = times[i] to s = times[i + 1]; by default the grid is
uniform, t_i = (N - i) / N, from the prior (t = 1) to the data (t = 0).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vdm_jax import _numerics
from vdm_jax.typing import GammaFn, Shape


def check_shape(shape: Shape) -> tuple[int, ...]:
  """Returns `shape` as a tuple of positive ints with a leading batch axis, else raises ValueError."""
  try:
    shape = tuple(int(d) for d in shape)
  except TypeError as err:
    raise ValueError(f"shape must be a sequence of ints like (B, H, W, C), got {shape!r}") from err
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ...) with at least 2 positive dims, got {shape}")
  return shape


def check_num_steps(num_steps: int) -> int:
  """Returns num_steps if it is an int >= 1, else raises ValueError."""
  if not _numerics.is_int(num_steps) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  return int(num_steps)


def time_grid(num_steps: int, *, t_start: float = 1.0, t_end: float = 0.0) -> jax.Array:
  r"""Uniform time grid t_i = t_end + (t_start - t_end) (N - i) / N, i = 0..N.

  With t_start = 1 and t_end = 0 this is t_i = (N - i) / N computed in float32,
  exactly as the reference sampler computes t and s.

  Args:
    num_steps: N >= 1 intervals.
    t_start: first time (1.0 for sampling from the prior).
    t_end: last time (0.0 returns z_0).

  Returns:
    float32 [N + 1], from t_start to t_end.
  """
  num_steps = check_num_steps(num_steps)
  frac = jnp.arange(num_steps, -1, -1, dtype=jnp.float32) / num_steps
  return t_end + (t_start - t_end) * frac


def check_times(times: ArrayLike) -> jax.Array:
  """Validates a 1-D grid of >= 2 times in [0, 1], strictly monotone when concrete; returns float32."""
  times = jnp.asarray(times, jnp.float32)
  if times.ndim != 1 or times.shape[0] < 2:
    raise ValueError(f"times must be 1-D with at least 2 entries, got shape {times.shape}")
  try:
    concrete = np.asarray(times)
  except jax.errors.TracerArrayConversionError:  # traced grid: no value check possible
    return times
  diffs = np.diff(concrete)
  if not (np.all(diffs < 0) or np.all(diffs > 0)) or concrete.min() < 0 or concrete.max() > 1:
    raise ValueError(f"times must be strictly monotone and in [0, 1], got {concrete}")
  return times


def grid_or_default(num_steps: int, times: ArrayLike | None) -> jax.Array:
  """`times` checked, or the uniform grid of num_steps intervals from 1 to 0 when times is None."""
  return time_grid(num_steps) if times is None else check_times(times)


def gamma_at(gamma_fn: GammaFn, t: ArrayLike, batch: int) -> jax.Array:
  """gamma_fn evaluated at the scalar time t as a [batch] vector (the network's gamma input)."""
  return jnp.reshape(gamma_fn(jnp.full((batch,), t, jnp.float32)), (batch,))
