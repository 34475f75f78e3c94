"""Base config shared by every experiment; other configs start from this one.

Not an experiment by itself (it describes the CIFAR-10 shapes); run a concrete
config instead, e.g.

  python main.py --config=configs/digits.py --workdir=/tmp/vdm_digits

Its home is vdm_jax.train.config.default_config (its model section is derived from
vdm_jax.model.ModelConfig's defaults), so notebooks and installed packages get the
same base.
"""
from vdm_jax.train import config as _config


def get_config():
  """Returns the base ConfigDict."""
  return _config.default_config()
