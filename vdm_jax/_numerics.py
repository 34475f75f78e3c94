"""The one home of small numerics and input checks shared by several core modules."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def is_int(value: object) -> bool:
  """True for Python and numpy integers (bool excluded); False for floats, arrays and bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
  """True for Python ints and floats (bool excluded; numpy float64 is a float); False else."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def sum_per_example(values: jax.Array) -> jax.Array:
  """Sums an array [B, ...] over all but the first axis: sum_{i > 0} values[b, i], [B].

  The one per-example reduction of every loss (nats summed over H, W, C).
  """
  return jnp.sum(jnp.reshape(values, (values.shape[0], -1)), axis=-1)


def alpha_ratio(gamma_from: ArrayLike, gamma_to: ArrayLike) -> jax.Array:
  r"""alpha_to / alpha_from = exp((softplus(gamma_from) - softplus(gamma_to)) / 2).

  From log alpha^2 = -softplus(gamma); exact for any order of the two gammas.

  Args:
    gamma_from: gamma of the start point, scalar or any shape.
    gamma_to: gamma of the end point, broadcastable with gamma_from.

  Returns:
    the ratio alpha_to / alpha_from, the broadcast shape of the two.
  """
  return jnp.exp(0.5 * (jax.nn.softplus(gamma_from) - jax.nn.softplus(gamma_to)))


def concrete_int_range(a: jax.Array) -> tuple[int, int] | tuple[None, None]:
  """(min, max) of a concrete non-empty array as ints, computed in numpy so that it also
  works for concrete arrays closed over inside jax.jit; (None, None) for tracers and empty."""
  if isinstance(a, jax.core.Tracer) or a.size == 0:
    return None, None
  a = np.asarray(a)
  return int(a.min()), int(a.max())
