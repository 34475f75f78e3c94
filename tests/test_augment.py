"""On-device augmentation: random translations of the training images."""
import jax
import numpy as np
import pytest

from train_helpers import tiny_config
from vdm_jax import train
from vdm_jax.train import augment


def test_random_shift_moves_each_image_by_at_most_m_pixels_with_zero_fill():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 17, (64, 8, 8, 1)).astype(np.int32)  # no zeros inside
  shifted = np.asarray(augment.random_shift(jax.random.PRNGKey(3), images, 1))
  seen = set()
  for original, moved in zip(images, shifted, strict=True):
    matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if np.array_equal(np.roll(np.pad(original, ((1, 1), (1, 1), (0, 0))),
                                         (dy, dx), axis=(0, 1))[1:-1, 1:-1], moved)]
    assert len(matches) == 1  # exactly one of the 9 shifts, the rest zero-filled
    seen.add(matches[0])
  assert len(seen) == 9  # 64 draws cover every shift (P(missing one) < 9 (8/9)^64 = 5e-3)
  np.testing.assert_array_equal(augment.random_shift(jax.random.PRNGKey(3), images, 0), images)


def test_an_augment_shift_as_large_as_the_image_is_refused():
  config = tiny_config()
  config.data.augment_shift = 8
  with pytest.raises(train.ConfigError, match="data.augment_shift must be an integer in"):
    train.validate_config(config, "/tmp")
