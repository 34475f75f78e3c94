"""Digits for 12 to 20 minutes (by the hour) on 2 CPU cores: a lean FiLM U-Net at batch 128.

Same data, network (a 32-wide one-level U-Net: 2 down, 2 middle with attention, 3 up FiLM
ResNet blocks, 250k parameters), schedule, Fourier features, grid skip and prior, time
proposal and evaluation as configs/digits.py, at the batch that the digits sweep
(benchmarks/digits_sweep.py, benchmarks/results/digits_sweep.jsonl) found best per
training step: 128, for 3,000 steps, at learning rate 2e-3. At this length the model
overfits without help, so a fifth of the training digits move by one pixel and the network
is told which (augmentation conditioning, Karras et al. 2022: conditioning 1 for a moved
image; evaluation and sampling use 0, the unmoved digits' distribution).

With weight decay 1.0 (AdamW's decoupled decay of the kernels; configs/digits.py uses 0.5)
it printed 2.0340, 1.7303 and **1.7025 +- 0.017** at steps 1,000, 2,000 and 3,000 (seed 0;
'bpd': 1.702506889803839), alone at 14:25-14:45 UTC in 19 min 35 s, an hour when the
virtual machine lost half its CPU time to its host (top: 50 % steal, 2.0 to 4.1 steps/s;
the same steps ran 3.9 to 5.3 steps/s at 08:23), and the same three figures beside other
runs at 13:25. With digits.py's 0.5 it printed 1.9522, 1.7161 and **1.7075 +- 0.017**
(seed 0, 11:45-12:03 UTC, 17 min while two sweep runs shared the machine for its first
10), against
1.8989, 1.7209 and 1.7170 without it (below). With it, 3,600 steps still overfit at the
end: 1.8516, 1.6999 and 1.7242 at steps 1,200, 2,400 and 3,600 (12:09-12:31 UTC), and a
2,400-step schedule ended at 1.7091 (alone, 8 min 29 s).

Before the weight decay, measured on the project's 2-core machine on 2026-12-02
04:44-05:12 UTC, seed 0, two runs side by side (so 2.0 to 2.3 steps/s, 28 min each): with
the augmentation 1.8989, 1.7209 and **1.7170 +- 0.017** test bits/dim (K = 16) at steps
1,000, 2,000 and 3,000; without it 1.8868, 1.7165 and 1.7325, overfitting after step
2,000. Alone at 05:39 UTC this config reproduced those figures bitwise in 15 min 54 s for
the whole command (2.7 to 4.1 steps/s, a slow hour), on one CPU device. On two
(cpu_devices = 2, inherited from configs/digits.py) it printed the same three figures in
12 min 24 s alone at 08:23 UTC (3.9 to 5.3 steps/s). 3,600 steps (alone, 12 min 58 s)
overfit: 1.8147, 1.7108 and 1.7236 at steps 1,200, 2,400 and 3,600; with
augment_probability 0.5 as well, 1.8243, 1.7174 and 1.7199. On 2026-12-01, alone, the
config of that day (same network and batch, no grid features, skip or augmentation) took
12 min 42 s at about 4.3 steps/s: 1.7550 +- 0.015.

  python main.py --config=configs/digits_long.py --workdir=/tmp/vdm_digits_long
"""
from configs import digits


def get_config():
  """Returns the longer digits ConfigDict."""
  config = digits.get_config()
  config.optimizer.learning_rate = 2e-3  # its figures above were measured at 2e-3 (digits: 3e-3)
  config.data.augment_shift = 1  # one-pixel shifts ...
  config.data.augment_probability = 0.2  # ... of a fifth of the training digits ...
  config.data.augment_conditioning = True  # ... which the network is told about
  config.optimizer.weight_decay = 1.0  # digits.py's 0.5 gave 1.7075 at seed 0 (see above)
  config.training.batch_size = 128
  config.training.num_steps = 3000
  config.training.log_every = 200
  config.training.eval_every = 1000
  config.training.checkpoint_every = 1000
  return config
