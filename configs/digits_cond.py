"""Class-conditional digits with classifier-free guidance (Ho & Salimans 2021).

Labels 0..9 condition the network; 10% of training labels are replaced by the
null label so the same network also learns p(x). Sampling with
guidance_weight w uses (1 + w) eps(z, c) - w eps(z, null).

  python main.py --config=configs/digits_cond.py --workdir=/tmp/vdm_digits_cond
  python main.py --config=configs/digits_cond.py --workdir=/tmp/vdm_digits_cond \
      --mode=sample --config.sample.guidance_weight=2.0 --config.sample.label=3
"""
from configs import digits


def get_config():
  """Returns the class-conditional digits ConfigDict."""
  config = digits.get_config()
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.sample.guidance_weight = 1.0
  return config
