"""NaN/Inf robustness: skipped steps keep the state, K in a row stop training, no NaN is saved.

NaN is injected through a wrapped model: a batch whose first pixel is -1 gets a
NaN loss, -2 a finite loss with a NaN gradient. Also: loss and gradients of the
whole model stay finite for gamma in [-30, 30] at pixels 0 and vocab-1, in
float32 and bfloat16 (tests/test_losses.py covers the loss terms alone).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm_jax.train import checkpoints
from vdm_jax.train import data
from vdm_jax import losses
from vdm_jax import model as model_lib
from vdm_jax import train
from vdm_jax.train import config as config_lib
from vdm_jax.train import inference
from vdm_jax.train import setup as setup_lib
from train_helpers import NAN_GRAD
from train_helpers import NAN_LOSS
from train_helpers import PoisonedModel
from train_helpers import assert_params_match
from train_helpers import hook_train_batches
from train_helpers import NOISE_PROOF_ADAM_EPS
from train_helpers import tiny_config

@pytest.fixture(scope="module")
def poisoned_setup():
  setup = train.Setup(tiny_config())
  setup.model = PoisonedModel(setup.model)
  return setup


def _batch(seed, poison=None):
  """The first batch of the digits pipeline shuffled with `seed` (a writable copy)."""
  batch = next(data.train_iterator(data.load_digits("train"), batch_size=8, seed=seed,
                                   num_threads=0))
  batch = {name: np.array(value) for name, value in batch.items()}
  if poison is not None:
    batch["image"][0, 0, 0, 0] = poison
  return batch


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("poison", [NAN_LOSS, NAN_GRAD], ids=["nan_loss", "nan_gradient"])
def test_nonfinite_step_keeps_params_ema_and_optimizer_state_and_advances_the_step(
    poisoned_setup, poison):
  setup = poisoned_setup
  state = setup.init_state()
  for seed in range(3):  # past the warm-up: a clean step would move everything
    state, _ = setup.train_step(state, setup.global_batch(_batch(seed)))
  before = _host(state)
  state, metrics = setup.train_step(state, setup.global_batch(_batch(3, poison)))
  metrics = jax.device_get(metrics)
  assert float(metrics["nonfinite"]) == 1.0
  assert np.isfinite(metrics["bpd"]) == (poison == NAN_GRAD)
  assert int(state.step) == int(before.step) + 1
  _assert_trees_equal(_host((state.params, state.ema_params, state.opt_state, state.rng)),
                      (before.params, before.ema_params, before.opt_state, before.rng))
  moved, metrics = setup.train_step(state, setup.global_batch(_batch(4)))
  assert jax.tree.structure(_host(moved.params)) == jax.tree.structure(before.params)
  assert float(jax.device_get(metrics["nonfinite"])) == 0.0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(moved.params)),
                                                       jax.tree.leaves(before.params), strict=True))


def _poison_calls(monkeypatch, calls, value=NAN_LOSS):
  """Makes the loop's n-th training batch (0-based, over all iterators) poisoned for n in `calls`."""
  def poison(n, batch):
    if n not in calls:
      return batch
    batch = {name: np.array(array) for name, array in batch.items()}
    batch["image"][0, 0, 0, 0] = value
    return batch
  hook_train_batches(monkeypatch, poison)


def _run_poisoned(setup, config, workdir, monkeypatch):
  setup.config = config  # same model and optimizer: the compiled step is reused
  monkeypatch.setattr(setup_lib, "get_setup", lambda _: setup)
  monkeypatch.setattr(inference, "evaluate_and_draw", lambda *args: {"bpd": 0.0})
  return train.train_and_evaluate(config, workdir)


def test_isolated_nonfinite_steps_are_skipped_logged_and_training_finishes(
    poisoned_setup, tmp_path, monkeypatch, caplog):
  config = tiny_config(num_steps=10)
  clean = data.train_iterator(data.load_digits("train"), batch_size=8, seed=config.seed,
                              num_threads=0)
  for _ in range(10):
    next(clean)
  config.training.max_nonfinite_steps = 2
  _poison_calls(monkeypatch, {2, 6, 7})  # steps 3, 7 and 8: 7 and 8 are 2 in a row
  with pytest.raises(train.TrainingError, match="2 consecutive steps up to step 8"):
    _run_poisoned(poisoned_setup, config, str(tmp_path / "two"), monkeypatch)
  monkeypatch.undo()  # the next hook counts batches from 0 again
  config.training.max_nonfinite_steps = 3
  _poison_calls(monkeypatch, {2, 6, 7}, NAN_GRAD)
  with caplog.at_level("INFO"):
    _run_poisoned(poisoned_setup, config, str(tmp_path / "three"), monkeypatch)
  assert "step 3: non-finite loss or gradient; step skipped" in caplog.text
  assert "step 8: non-finite loss or gradient; step skipped (params unchanged), 2 in a row, " \
         "3 in all" in caplog.text
  assert "train/nonfinite=0.2" in caplog.text  # steps 6..10: two of five skipped
  manager = checkpoints.make_manager(tmp_path / "three" / "checkpoints")
  step, state, position = checkpoints.restore(manager, poisoned_setup.abstract_state())
  manager.close()
  assert step == 10 and int(state.step) == 10
  assert checkpoints.first_nonfinite_leaf(state) is None
  # The skipped steps consumed their batches: the saved position is that of 10 batches
  # taken, as in a run without NaN, so a resume does not repeat or skip data.
  assert position == clean.get_state()


def test_k_consecutive_nonfinite_steps_stop_with_one_line_error_and_save_nothing_more(
    poisoned_setup, tmp_path, monkeypatch):
  config = tiny_config(num_steps=30)
  config.training.max_nonfinite_steps = 4
  _poison_calls(monkeypatch, set(range(6, 100)))  # from step 7 on
  with pytest.raises(train.TrainingError) as info:
    _run_poisoned(poisoned_setup, config, str(tmp_path), monkeypatch)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("training diverged: 4 consecutive steps up to step 10 had a "
                            "non-finite loss or gradient (training.max_nonfinite_steps=4)")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
  assert not os.path.exists(tmp_path / "LOCK")


def test_a_state_with_nan_is_never_checkpointed_and_the_leaf_is_named(tmp_path):
  rng = np.random.default_rng(1610)
  good = {"params": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
          "step": jnp.asarray(5, jnp.int32)}
  bad = {"params": {"w": good["params"]["w"].at[1, 0].set(jnp.inf)}, "step": good["step"]}
  manager = checkpoints.make_manager(tmp_path)
  assert checkpoints.save(manager, 5, good, {})
  with pytest.raises(ValueError, match=r"refusing to save checkpoint 6: the state has NaN/Inf "
                     r"in params/w"):
    checkpoints.save(manager, 6, bad, {})
  manager.wait_until_finished()
  assert manager.all_steps() == [5]
  manager.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_loss_and_gradients_are_finite_for_gamma_in_pm30_at_extreme_pixels(dtype):
  vocab = 17
  model = model_lib.VDM(model_lib.ModelConfig(
      vocab_size=vocab, image_shape=(8, 8, 1), n_embd=32, n_layer=0, dropout=0.0,
      with_fourier_features=True, schedule="learned_linear", gamma_min=-30.0, gamma_max=30.0,
      dtype=dtype))
  rng = np.random.default_rng(1611)
  x = np.stack([np.zeros((8, 8, 1)), np.full((8, 8, 1), vocab - 1),
                rng.choice([0, vocab - 1], (8, 8, 1))]).astype(np.int32)
  params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x[:1])

  def mean_loss(params, key):
    loss, terms = model.loss(params, x, key, train=True)
    return jnp.mean(loss), terms

  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  (loss, terms), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params, key)
  assert np.isfinite(loss) and loss > 0
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(terms))
  assert checkpoints.first_nonfinite_leaf(grads) is None
  gamma = jax.jit(model.gamma_fn(params))(jnp.asarray([0.0, 1.0]))
  np.testing.assert_allclose(gamma, [-30.0, 30.0], rtol=1e-6)


@pytest.fixture(scope="module")
def accumulating():
  """(setup with accumulation_steps=2 and a poisoned model, the same AdamW without
  MultiSteps, the jitted gradient of the step's loss at given params, images and key)."""
  config = tiny_config()
  config.optimizer.warmup_steps, config.optimizer.decay = 0, "constant"
  config.optimizer.eps = NOISE_PROOF_ADAM_EPS
  plain = config_lib.optimizer_from_config(config)[0]
  config.optimizer.accumulation_steps = 2
  setup = train.Setup(config)
  setup.model = PoisonedModel(setup.model)

  @jax.jit
  def grads(params, image, key):
    bpd = lambda p: jnp.mean(losses.bits_per_dim(
        setup.model.loss(p, image, key, train=True)[0], setup.model.num_dims))
    return jax.grad(bpd)(params)

  return setup, plain, grads


def _run_steps(setup, batches):
  """(host copy of the initial state, host copies of the state after each batch, metrics)."""
  state = setup.init_state()
  initial, states = _host(state), []
  for batch in batches:
    state, metrics = setup.train_step(state, setup.global_batch(batch))
    states.append(_host(state))
  return initial, states, jax.device_get(metrics)


def _one_update(accumulating, start, opt_state, micro_batches):
  """AdamW on the mean gradient of (step, batch) pairs at start.params, and the EMA after it:
  (params, ema_params, AdamW state)."""
  setup, plain, grads = accumulating
  gradients = [grads(start.params, jnp.asarray(batch["image"]), jax.random.fold_in(start.rng, n))
               for n, batch in micro_batches]
  return _adamw_and_ema(plain, setup.config.optimizer.ema_decay, gradients, opt_state,
                        start.params, start.ema_params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adamw_and_ema(plain, decay, gradients, opt_state, params, ema_params):
  """One compiled program (leaf-by-leaf eager ops would compile one program per op)."""
  mean = jax.tree.map(lambda *g: sum(g) / len(g), *gradients)
  updates, opt_state = plain.update(mean, opt_state, params)
  params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
  return params, ema, opt_state


def _assert_close(actual, expected, lr, num_updates):
  """float32: the step's gradients and these differ in rounding only (fused differently),
  which Adam passes on as that relative error of lr; the fixture's Adam eps
  (NOISE_PROOF_ADAM_EPS) keeps exactly-zero gradients' rounding noise from becoming
  +-lr steps (train_helpers.assert_params_match allows a few such elements anyway)."""
  assert_params_match(actual, expected, learning_rates=[lr] * num_updates, rtol=1e-6)


def test_accumulated_micro_batches_move_params_and_ema_once_per_window(accumulating):
  """accumulation_steps=2 over b0..b3: after b0 and b2 nothing moves; after b1 and b3 the
  params take one AdamW update with the window's mean gradient (optax.MultiSteps) and the
  EMA moves once, toward the updated params."""
  setup, plain, _ = accumulating
  batches = [_batch(10 + n) for n in range(4)]
  initial, states, _ = _run_steps(setup, batches)
  lr = setup.config.optimizer.learning_rate
  opt_state, before = plain.init(initial.params), initial
  for first in (0, 2):
    _assert_trees_equal((states[first].params, states[first].ema_params),
                        (before.params, before.ema_params))
    params, ema, opt_state = _one_update(accumulating, before, opt_state,
                                         [(first, batches[first]), (first + 1, batches[first + 1])])
    _assert_close(states[first + 1].params, params, lr, first // 2 + 1)
    _assert_close(states[first + 1].ema_params, ema, lr, first // 2 + 1)
    before = states[first + 1]
  assert int(states[3].opt_state.gradient_step) == 2


def test_a_skipped_micro_batch_does_not_shift_the_accumulation_window(accumulating):
  """accumulation_steps=2, micro-batches b0, b1 (NaN gradient), b2: b1 is skipped, so the
  first update averages the gradients of b0 and b2, and the EMA moves once, with it."""
  setup, plain, _ = accumulating
  batches = [_batch(0), _batch(1, NAN_GRAD), _batch(2)]
  initial, states, metrics = _run_steps(setup, batches)
  assert float(metrics["nonfinite"]) == 0.0
  _assert_trees_equal(states[0].params, initial.params)  # window of 2: nothing applied yet
  _assert_trees_equal(states[0].ema_params, initial.ema_params)
  _assert_trees_equal((states[1].params, states[1].ema_params, states[1].opt_state),
                      (states[0].params, states[0].ema_params, states[0].opt_state))
  assert int(states[2].opt_state.gradient_step) == 1 and int(states[2].opt_state.mini_step) == 0
  params, ema, _ = _one_update(accumulating, initial, plain.init(initial.params),
                               [(0, batches[0]), (2, batches[2])])
  lr = setup.config.optimizer.learning_rate
  _assert_close(states[2].params, params, lr, 1)
  _assert_close(states[2].ema_params, ema, lr, 1)
  assert jax.tree.structure(states[2].ema_params) == jax.tree.structure(initial.ema_params)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[2].ema_params),
                                                       jax.tree.leaves(initial.ema_params), strict=True))
