"""Tests of vdm_jax.checkpoints: round trip, keep-N, named steps, corrupt fallback."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.train import checkpoints


def _state(rng):
  return {"params": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
          "step": jnp.asarray(rng.integers(100), jnp.int32),
          "rng": jax.random.PRNGKey(int(rng.integers(1 << 30)))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, states, steps, max_to_keep):
  manager = checkpoints.make_manager(directory, max_to_keep=max_to_keep)
  for step, state in zip(steps, states, strict=True):
    assert checkpoints.save(manager, step, state, {"epoch": step // 10, "index": step % 10})
  manager.close()


def test_restore_returns_newest_state_and_data_position_bit_exactly(tmp_path):
  rng = np.random.default_rng(1641)
  states = [_state(rng) for _ in range(3)]
  _save_steps(tmp_path, states, (5, 10, 15), max_to_keep=5)
  manager = checkpoints.make_manager(tmp_path, max_to_keep=5)
  step, state, position = checkpoints.restore(manager, _abstract(states[0]))
  assert step == 15 and position == {"epoch": 1, "index": 5}
  _assert_tree_equal(state, states[2])
  step, state, _ = checkpoints.restore(manager, _abstract(states[0]), step=5)
  assert step == 5
  _assert_tree_equal(state, states[0])
  manager.close()


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
  rng = np.random.default_rng(1642)
  _save_steps(tmp_path, [_state(rng) for _ in range(4)], (1, 2, 3, 4), max_to_keep=2)
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_saving_an_existing_step_is_refused_and_keeps_the_first(tmp_path):
  rng = np.random.default_rng(1643)
  first, second = _state(rng), _state(rng)
  manager = checkpoints.make_manager(tmp_path)
  assert checkpoints.save(manager, 7, first, {})
  manager.wait_until_finished()
  assert not checkpoints.save(manager, 7, second, {})
  _, state, _ = checkpoints.restore(manager, _abstract(first))
  _assert_tree_equal(state, first)
  manager.close()


def test_corrupt_newest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog):
  rng = np.random.default_rng(1644)
  states = [_state(rng) for _ in range(2)]
  _save_steps(tmp_path, states, (5, 10), max_to_keep=3)
  for root, _, files in os.walk(tmp_path / "10"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  manager = checkpoints.make_manager(tmp_path)
  with caplog.at_level("WARNING"):
    step, state, _ = checkpoints.restore(manager, _abstract(states[0]))
  manager.close()
  assert step == 5
  _assert_tree_equal(state, states[0])
  assert "checkpoint 10" in caplog.text and "falling back" in caplog.text


def test_missing_named_step_and_empty_directory(tmp_path):
  manager = checkpoints.make_manager(tmp_path)
  assert checkpoints.restore(manager, _abstract(_state(np.random.default_rng(1645)))) is None
  with pytest.raises(ValueError, match="no checkpoint for step 3"):
    checkpoints.restore(manager, {}, step=3)
  manager.close()


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpoints.make_manager("ckpt")
  assert os.path.isabs(str(manager.directory))
  manager.close()
