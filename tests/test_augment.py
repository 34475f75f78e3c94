"""On-device augmentation: random translations of the training images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import tiny_config
from vdm_jax import losses
from vdm_jax import train
from vdm_jax.train import augment
from vdm_jax.train import data


def test_random_shift_moves_each_image_by_at_most_m_pixels_with_zero_fill():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 17, (64, 8, 8, 1)).astype(np.int32)  # no zeros inside
  shifted, moved = map(np.asarray, augment.random_shift(jax.random.PRNGKey(3), images, 1))
  seen = set()
  for original, image, flag in zip(images, shifted, moved, strict=True):
    matches = _shifts_between(original, image)
    assert len(matches) == 1  # exactly one of the 9 shifts, the rest zero-filled
    assert flag == float(matches[0] != (0, 0))
    seen.add(matches[0])
  assert len(seen) == 9  # 64 draws cover every shift (P(missing one) < 9 (8/9)^64 = 5e-3)
  unmoved, flags = augment.random_shift(jax.random.PRNGKey(3), images, 0)
  np.testing.assert_array_equal(unmoved, images)
  np.testing.assert_array_equal(flags, np.zeros(64))


def _shifts_between(original, image):
  """The (dy, dx) in {-1, 0, 1}^2 that move original [H, W, C] onto image (zero-filled)."""
  return [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
          if np.array_equal(np.roll(np.pad(original, ((1, 1), (1, 1), (0, 0))),
                                    (dy, dx), axis=(0, 1))[1:-1, 1:-1], image)]


def test_random_shift_with_a_probability_moves_that_share_of_the_images():
  # An image moves with probability p (8/9 of the drawn shifts are not (0, 0)): 4,000
  # images put the moved share within 5 sd = 5 sqrt(q (1 - q) / 4000) = 0.033 of q = 8p/9.
  rng = np.random.default_rng(1)
  images = rng.integers(1, 17, (4000, 8, 8, 1)).astype(np.int32)
  shifted, moved = map(np.asarray, augment.random_shift(jax.random.PRNGKey(5), images, 1, 0.25))
  assert abs(moved.mean() - 0.25 * 8 / 9) < 0.033
  still = moved == 0
  np.testing.assert_array_equal(shifted[still], images[still])
  assert not np.any(np.all(shifted[~still] == images[~still], axis=(1, 2, 3)))


def test_an_augment_shift_as_large_as_the_image_is_refused():
  config = tiny_config()
  config.data.augment_shift = 8
  with pytest.raises(train.ConfigError, match="data.augment_shift must be an integer in"):
    train.validate_config(config, "/tmp")


@pytest.mark.parametrize("field, value, words", [
    ("augment_probability", 0.0, "augment_probability must be a number in"),
    ("augment_probability", 1.5, "augment_probability must be a number in"),
])
def test_bad_augmentation_settings_are_refused(field, value, words):
  config = tiny_config()
  config.data.augment_shift = 1
  config.data[field] = value
  with pytest.raises(train.ConfigError, match=words):
    train.validate_config(config, "/tmp")


def test_augment_conditioning_without_a_shift_is_refused():
  config = tiny_config()
  config.data.augment_conditioning = True
  with pytest.raises(train.ConfigError, match="augment_conditioning=True needs"):
    train.validate_config(config, "/tmp")


def test_augment_conditioning_gives_the_network_which_images_moved():
  # The train step's bound equals model.loss on the shifted batch with conditioning = moved
  # and differs from the bound without it.
  config = tiny_config()
  config.data.update(augment_shift=1, augment_probability=0.5, augment_conditioning=True)
  # The FiLM U-Net: the tiny ScoreUNet's 32 GroupNorm groups of one channel each remove the
  # conditioning's per-channel shift (as in the reference at that width).
  config.model.update(network="unet", n_embd=16, n_layer=0, channel_mult=(1,),
                      attention_resolutions=())
  setup = train.get_setup(config)
  # Random params: at init the zero-initialised output layers hide the conditioning.
  rng = np.random.default_rng(7)
  state = setup.init_state()
  state = state.replace(params=jax.tree.map(
      lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), state.params))
  batch = next(data.train_iterator(data.load_digits("train"), batch_size=8, seed=0))
  _, metrics = setup.train_step.gradient(state, setup.global_batch(batch))
  key = jax.random.fold_in(state.rng, state.step)
  images, moved = augment.random_shift(jax.random.fold_in(key, 1), batch["image"], 1, 0.5)
  assert 0 < float(moved.sum()) < 8  # some moved, some not
  def bpd(conditioning):
    loss, _ = setup.model.loss(state.params, images, key, train=True, conditioning=conditioning)
    return jnp.mean(losses.bits_per_dim(loss, setup.model.num_dims))

  # Jitted (op by op this took about twice as long): rtol 1e-5 is some 100 float32 ulps of
  # the batch-mean bound, far above two programs' different summation orders.
  with_moved = float(jax.jit(bpd)(moved))
  np.testing.assert_allclose(metrics["bpd"], with_moved, rtol=1e-5)
  assert abs(with_moved - float(jax.jit(lambda: bpd(None))())) > 1e-4
