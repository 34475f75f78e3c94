"""CIFAR-10 with the VDM paper's setup (Kingma et al. 2021, table 1 / appendix).

ScoreUNet, 32 residual blocks x 128 channels, no attention, dropout 0.1,
learned linear gamma in [-13.3, 5.0], continuous time, antithetic time
sampling, AdamW (lr 2e-4, b1 0.9, b2 0.99, weight decay 0.01, 100 warm-up
steps), EMA 0.9999, batch 128, 10M steps.

  tfds build cifar10 --file_format=array_record   # once
  python main.py --config=configs/cifar10.py --workdir=/tmp/vdm_cifar10
"""
from configs import default


def get_config():
  """Returns the CIFAR-10 ConfigDict."""
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.model.image_shape = (32, 32, 3)
  config.model.n_embd = 128
  config.model.n_layer = 32
  config.model.with_attention = False
  config.model.dropout = 0.1
  config.model.schedule = "learned_linear"
  config.optimizer.grad_clip_norm = 0.0
  config.training.batch_size = 128
  config.training.num_steps = 10_000_000
  return config
