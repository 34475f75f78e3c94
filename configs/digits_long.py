"""Digits for about 12 minutes on 2 CPU cores: a lean FiLM U-Net at batch 128.

Same data, schedule, Fourier features and evaluation as configs/digits.py, with
the network and batch that the digits sweep (benchmarks/digits_sweep.py,
benchmarks/results/digits_sweep.jsonl) found best per training step: a 32-wide
one-level U-Net (2 down, 2 middle with attention, 3 up FiLM ResNet blocks,
249k parameters) at batch 128 for 3,000 steps, with configs/digits.py's importance-
sampled times, grid-aligned Fourier features and grid skip. Measured on the project's
2-core machine on 2026-12-02: 1.7352 +- 0.016 test bits/dim (K = 16) at step 3,000 and
1.7271 +- 0.015 at step 2,000, in a slow hour (1.4 to 3.2 steps/s, partly beside other
jobs; 26 min 9 s for the whole command); a 2,000-step run (cosine to 0 there) gave
1.7373 +- 0.015, a tie. With the integer Fourier exponents (2, 3) and no skip, on 2026-12-01: 1.7550
+- 0.015 in 12 min 42 s (training about 4.3 steps/s); with uniform times as well 1.7564
+- 0.016 in 12 min 32 s.

  python main.py --config=configs/digits_long.py --workdir=/tmp/vdm_digits_long
"""
from configs import digits


def get_config():
  """Returns the longer digits ConfigDict."""
  config = digits.get_config()
  config.model.n_layer = 2  # 2 down, 2 middle, 3 up FiLM blocks on the one 8x8 level
  config.optimizer.learning_rate = 2e-3  # its figures above were measured at 2e-3 (digits: 3e-3)
  config.training.batch_size = 128
  config.training.num_steps = 3000
  config.training.log_every = 200
  config.training.eval_every = 1000
  config.training.checkpoint_every = 1000
  return config
