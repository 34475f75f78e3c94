"""The CIFAR-10 paper config's train step (batch 8): the update program compiles with a
handful of finiteness checks, and the gradient program lowers to the paper's FLOPs.

A regression guard for compile blow-ups: a non-finite guard written as a jnp.where per
leaf once made XLA copy one reduction into every leaf's fusion (2474 is-finite ops in
the optimised HLO at the paper's 691 parameter leaves), and the paper step's compile took
more than 10 minutes and 19 GB here. The guard lives in the update program
(vdm_jax.train.step.make_update_step). That program is compiled for the paper's ScoreUNet
at 4 layers instead of 32 (131 parameter leaves, the same blocks; about 5 s instead of 25 s
here), where such a guard would still put one is-finite op in every leaf's fusion: far
more than the handful allowed. No time is asserted (a blow-up shows as a slow or failing
suite); benchmarks/paper_start.py measures the whole first step's compile time and memory
at the paper's scale through main.py.

The gradient program (the network's forward and backward) of the paper config itself is
lowered, not compiled (its compile takes about 30 s here); its lowered HLO must hold no
per-leaf finiteness check either.
"""
import jax
import pytest

from configs import cifar10
from vdm_jax import train


def _setup(n_layer):
  config = cifar10.get_config()
  config.training.batch_size = 8
  config.model.n_layer = n_layer
  return train.Setup(config)


@pytest.mark.slow
def test_cifar10_paper_train_step_has_one_finiteness_reduction_per_leaf_at_most():
  setup = _setup(cifar10.get_config().model.n_layer)
  step, state = setup.train_step, setup.abstract_state()
  assert len(jax.tree.leaves(state.params)) == 691
  gradient = step.gradient.lower(state, setup.abstract_batch())
  assert gradient.as_text().count("is_finite") < 50
  # Forward + backward of a 30.6M-parameter ScoreUNet on 8 images of 32x32x3: ~1.2e12 FLOPs.
  assert gradient.cost_analysis()["flops"] > 1e12

  shallow = _setup(4)
  step, state = shallow.train_step, shallow.abstract_state()
  assert len(jax.tree.leaves(state.params)) == 131
  gradient = step.gradient.lower(state, shallow.abstract_batch())
  update = step.update.lower(state, *gradient.out_info).compile()
  # The guard reduces the loss and the global gradient norm: a handful of is-finite ops,
  # far fewer than one per parameter leaf.
  assert update.as_text().count("is-finite(") < 50
