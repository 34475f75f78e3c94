"""Data augmentation on the device, inside the train step.

Only transformations under which the data's distribution is plausibly invariant belong
here: small translations of centred digits are; flips of digits are not. Test-set
evaluation never augments.
"""
import jax
import jax.numpy as jnp

from vdm_jax.typing import PRNGKey


def random_shift(key: PRNGKey, images: jax.Array, max_shift: int) -> jax.Array:
  """Moves each image by (dy, dx), each uniform on {-max_shift, ..., max_shift}, zero-filled.

  Args:
    key: PRNG key (one offset pair per image is drawn from it).
    images: integer images [B, H, W, C] (0 is the background value).
    max_shift: m >= 0, the largest shift in pixels along each axis.

  Returns:
    the shifted images, [B, H, W, C], same dtype.
  """
  if max_shift == 0:
    return images
  _, height, width, channels = images.shape
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * m + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)
