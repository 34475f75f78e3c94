"""MNIST (28x28x1, 256 grey levels) with a ScoreUNet.

  tfds build mnist --file_format=array_record   # once
  python main.py --config=configs/mnist.py --workdir=/tmp/vdm_mnist
"""
from configs import default


def get_config():
  """Returns the MNIST ConfigDict."""
  config = default.get_config()
  config.data.dataset = "mnist"
  config.model.image_shape = (28, 28, 1)
  config.model.n_embd = 64
  config.model.n_layer = 8
  config.model.dropout = 0.1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.ema_decay = 0.9995
  config.training.batch_size = 128
  config.training.num_steps = 200_000
  config.training.eval_every = 5_000
  config.training.checkpoint_every = 5_000
  return config
