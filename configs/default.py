"""Base config shared by every experiment; other configs start from this one.

Not an experiment by itself (it describes the CIFAR-10 shapes); run a concrete
config instead, e.g.

  python main.py --config=configs/digits.py --workdir=/tmp/vdm_digits
"""
import ml_collections


def model_config():
  """Fields of vdm_jax.model.ModelConfig, with its defaults."""
  return ml_collections.ConfigDict(dict(
      vocab_size=256,
      image_shape=(32, 32, 3),
      num_classes=0,
      network="score_unet",
      n_embd=128,
      n_layer=32,
      with_attention=False,
      with_fourier_features=True,
      fourier_exponents=(6, 7),
      dropout=0.1,
      channel_mult=(1, 2, 2, 2),
      attention_resolutions=(16,),
      patch_size=2,
      num_heads=4,
      schedule="learned_linear",
      gamma_min=-13.3,
      gamma_max=5.0,
      num_steps=0,
      antithetic=True,
      variance_minimising=False,
      label_dropout=0.1,
      dtype="float32",
  ))


def get_config():
  """Returns the base ConfigDict."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      dataset="cifar10",   # digits | mnist | fashion_mnist | cifar10 | imagenet32 | imagenet64 | npz | image_folder
      data_dir="",         # tfds data_dir ("" = tfds default, ~/tensorflow_datasets)
      path="",             # .npz file or image folder (npz / image_folder only)
      test_fraction=0.1,   # npz / image_folder: held-out fraction
      split_seed=0,        # npz / image_folder: seed of the fixed train/test split
  ))

  config.model = model_config()

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-4,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.01,
      warmup_steps=100,
      decay="constant",        # constant | cosine (to 0 at training.num_steps)
      grad_clip_norm=1.0,      # global-norm clipping; 0 disables it
      accumulation_steps=1,    # >1: optax.MultiSteps over that many batches
      ema_decay=0.9999,
  ))

  config.training = ml_collections.ConfigDict(dict(
      batch_size=128,          # global batch over all devices and hosts
      num_steps=10_000_000,
      log_every=100,
      eval_every=10_000,
      checkpoint_every=10_000,
      keep_checkpoints=3,
      max_nonfinite_steps=10,  # stop after this many non-finite steps in a row (each is skipped)
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=128,
      num_examples=0,          # 0 = the whole test split
      num_time_samples=1,      # K antithetic time samples per example (more: lower variance)
  ))

  config.sample = ml_collections.ConfigDict(dict(
      sampler="ancestral",     # ancestral | ddim | ode
      num_steps=1000,
      num_images=64,
      guidance_weight=0.0,     # class-conditional models only
      label=-1,                # class of the samples; -1 cycles over classes
      gif=False,               # --mode=sample also writes the reverse process as a GIF
      gif_frames=20,
      checkpoint_step=-1,      # eval/sample: -1 = newest checkpoint
      seed=1,
  ))
  return config
