"""Tests of vdm_jax.losses: the VDM bound, its terms and their estimators."""
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import losses
from vdm_jax import schedules


def test_vdm_loss_returns_finite_per_example_terms_that_sum_to_the_loss():
  key_x, key = jax.random.split(jax.random.PRNGKey(np.random.randint(2**31)))
  x = jax.random.randint(key_x, (3, 4, 4, 3), 0, 256)
  gamma_fn = schedules.fixed_linear()
  for num_steps in (0, 10):
    loss, terms = jax.jit(lambda x, k: losses.vdm_loss(lambda z, g: 0.9 * z, gamma_fn, x, k, num_steps=num_steps))(x, key)
    assert loss.shape == (3,) and set(terms) == {"prior", "reconstruction", "diffusion"}
    np.testing.assert_allclose(loss, terms["prior"] + terms["reconstruction"] + terms["diffusion"], rtol=1e-6)
    assert np.all(np.isfinite(loss)) and np.all(np.asarray(loss) > 0)
