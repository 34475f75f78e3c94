"""Downsampled ImageNet 64x64 with a multi-resolution U-Net.

  tfds build imagenet_resized/64x64 --file_format=array_record   # once (needs the ImageNet archives)
  python main.py --config=configs/imagenet64.py --workdir=/tmp/vdm_imagenet64
"""
from configs import default


def get_config():
  """Returns the ImageNet 64x64 ConfigDict."""
  config = default.get_config()
  config.data.dataset = "imagenet64"
  config.model.image_shape = (64, 64, 3)
  config.model.network = "unet"
  config.model.n_embd = 128
  config.model.n_layer = 3
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.attention_resolutions = (16, 8)  # the unet network attends at these sizes
  config.model.dropout = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.training.batch_size = 256
  config.training.num_steps = 2_000_000
  config.eval.batch_size = 256
  return config
