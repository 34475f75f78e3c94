"""The CIFAR-10 paper config's train step (batch 8): the update program compiles with a
handful of finiteness checks, and the gradient program lowers to the paper's FLOPs.

A regression guard for compile blow-ups: a non-finite guard written as a jnp.where per
leaf once made XLA copy one reduction into every leaf's fusion (2474 is-finite ops in
the optimised HLO), and this compile took more than 10 minutes and 19 GB here. The guard
lives in the update program (vdm_jax.train.step.make_update_step), so that program is
compiled at the paper's 691 parameter leaves and its optimised HLO is checked; no time is
asserted (a blow-up shows as a slow or failing suite).

The gradient program (the network's forward and backward) is lowered, not compiled: its
compile takes about 30 s here, and benchmarks/paper_start.py measures the whole first
step's compile time and memory at this scale through main.py. Its lowered HLO must hold
no per-leaf finiteness check either.
"""
import jax
import pytest

from configs import cifar10
from vdm_jax import train


@pytest.mark.slow
def test_cifar10_paper_train_step_has_one_finiteness_reduction_per_leaf_at_most():
  config = cifar10.get_config()
  config.training.batch_size = 8
  setup = train.Setup(config)
  step, state = setup.train_step, setup.abstract_state()
  num_leaves = len(jax.tree.leaves(state.params))
  assert num_leaves == 691
  gradient = step.gradient.lower(state, setup.abstract_batch())
  update = step.update.lower(state, *gradient.out_info).compile()
  # The guard reduces the loss and the global gradient norm: a handful of is-finite ops,
  # far fewer than one per parameter leaf.
  assert update.as_text().count("is-finite(") < 50
  assert gradient.as_text().count("is_finite") < 50
  # Forward + backward of a 30.6M-parameter ScoreUNet on 8 images of 32x32x3: ~1.2e12 FLOPs.
  assert gradient.cost_analysis()["flops"] > 1e12
