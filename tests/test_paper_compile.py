"""The CIFAR-10 paper config's train step (batch 8) lowers and compiles on CPU.

A regression guard for compile blow-ups: a non-finite guard written as a jnp.where per
leaf once made XLA copy one reduction into every leaf's fusion (2474 is-finite ops in
the optimised HLO), and this compile took more than 10 minutes and 19 GB here. No time
is asserted: a blow-up shows as a slow or failing suite, and the HLO's structure is
checked directly.

The two programs (Setup.compile_train_step) are compiled with XLA's default fusion
emitters, as users compile them, overriding the tests' --xla_cpu_use_fusion_emitters=false
(conftest.py) for this compile only: that flag speeds up the suite's tiny programs, but
the paper network's gradient program took 110 s to compile with it against 27 s without
(2026-12-01, this 2-core machine, LLVM flags of conftest.py on in both).
"""
import jax
import pytest

from configs import cifar10
from vdm_jax import train

DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


@pytest.mark.slow
def test_cifar10_paper_train_step_compiles_with_one_finiteness_reduction_per_leaf_at_most():
  config = cifar10.get_config()
  config.training.batch_size = 8
  setup = train.Setup(config)
  compiled, flops = setup.compile_train_step(DEFAULT_EMITTERS)
  hlo = compiled.gradient.as_text() + compiled.update.as_text()
  num_leaves = len(jax.tree.leaves(setup.abstract_state().params))
  # The guard reduces the loss and the global gradient norm: a handful of is-finite ops in
  # the two programs together, far fewer than one per parameter leaf (691 here).
  assert num_leaves == 691
  assert hlo.count("is-finite(") < 50
  # Forward + backward of a 30.6M-parameter ScoreUNet on 8 images of 32x32x3: ~1.2e12 FLOPs.
  assert flops is not None and flops > 1e12
