"""Fashion-MNIST (28x28x1, 256 grey levels) with a ScoreUNet.

  tfds build fashion_mnist --file_format=array_record   # once
  python main.py --config=configs/fashion_mnist.py --workdir=/tmp/vdm_fashion
"""
from configs import mnist


def get_config():
  """Returns the Fashion-MNIST ConfigDict."""
  config = mnist.get_config()
  config.data.dataset = "fashion_mnist"
  return config
