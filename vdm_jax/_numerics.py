"""The one home of small numerics and input checks shared by several core modules."""
import jax
import jax.numpy as jnp
import numpy as np


def is_int(value) -> bool:
  """True for Python and numpy integers (bool excluded)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def sum_per_example(values: jax.Array) -> jax.Array:
  """Sums an array [B, ...] over all but the first axis: [B]."""
  return jnp.sum(jnp.reshape(values, (values.shape[0], -1)), axis=-1)


def alpha_ratio(gamma_from: jax.Array, gamma_to: jax.Array) -> jax.Array:
  r"""alpha_to / alpha_from = exp((softplus(gamma_from) - softplus(gamma_to)) / 2).

  From log alpha^2 = -softplus(gamma); exact for any order of the two gammas.
  """
  return jnp.exp(0.5 * (jax.nn.softplus(gamma_from) - jax.nn.softplus(gamma_to)))
