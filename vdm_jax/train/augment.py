"""Data augmentation on the device, inside the train step.

Only transformations under which the data's distribution is plausibly invariant belong
here: small translations of centred digits are; flips of digits are not. Test-set
evaluation never augments.
"""
import jax
import jax.numpy as jnp

from vdm_jax.typing import PRNGKey


def random_shift(key: PRNGKey, images: jax.Array, max_shift: int,
                 probability: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Moves each image by (dy, dx), each uniform on {-max_shift, ..., max_shift}, zero-filled.

  With probability < 1 each image keeps its place with probability 1 - probability (a
  drawn shift is then set to (0, 0)). The second output says which images moved, for
  augmentation conditioning (Karras et al. 2022, "Elucidating the design space of
  diffusion-based generative models", non-leaky augmentation): a network told c = moved learns the
  unmoved images' distribution at c = 0, which evaluation and sampling use.

  Args:
    key: PRNG key (one offset pair per image is drawn from it; the keep-or-move draws
      from fold_in(key, 1)).
    images: integer images [B, H, W, C] (0 is the background value).
    max_shift: m >= 0, the largest shift in pixels along each axis.
    probability: in (0, 1], the chance that an image's drawn shift is applied.

  Returns:
    (the shifted images [B, H, W, C], same dtype; moved, float32 [B]: 1.0 where the
    applied shift is not (0, 0), else 0.0).
  """
  batch, height, width, channels = images.shape
  if max_shift == 0:
    return images, jnp.zeros((batch,), jnp.float32)
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * m + 1)
  if probability < 1.0:
    apply = jax.random.bernoulli(jax.random.fold_in(key, 1), probability, (batch, 1))
    offsets = jnp.where(apply, offsets, m)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
  moved = jnp.any(offsets != m, axis=1).astype(jnp.float32)
  return jax.vmap(crop)(padded, offsets), moved
