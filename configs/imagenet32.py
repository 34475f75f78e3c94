"""Downsampled ImageNet 32x32 (VDM paper setup: ScoreUNet 32 x 256, no dropout).

  tfds build imagenet_resized/32x32 --file_format=array_record   # once (needs the ImageNet archives)
  python main.py --config=configs/imagenet32.py --workdir=/tmp/vdm_imagenet32
"""
from configs import default


def get_config():
  """Returns the ImageNet 32x32 ConfigDict."""
  config = default.get_config()
  config.data.dataset = "imagenet32"
  config.model.image_shape = (32, 32, 3)
  config.model.n_embd = 256
  config.model.n_layer = 32
  config.model.dropout = 0.0
  config.optimizer.grad_clip_norm = 0.0
  config.training.batch_size = 512
  config.training.num_steps = 2_000_000
  config.eval.batch_size = 512
  return config
