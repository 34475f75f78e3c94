"""Tests of vdm_jax.train.data: sources, the grain pipelines (resume, shards, epochs), eval passes."""
import types

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from vdm_jax.train import checkpoints
from vdm_jax.train import data
from vdm_jax.train import loop


def _source(n=23, shape=(4, 4, 1), seed=0):
  rng = np.random.default_rng(seed)
  return data.ArraySource(rng.integers(0, 256, (n, *shape)), np.arange(n, dtype=np.int32))


def _assert_pipelines_read(train, test, *, batch_size):
  """One training batch and one evaluation pass (every test example once) of two sources."""
  batch = next(data.train_iterator(train, batch_size=batch_size, seed=0))
  assert batch["image"].shape == (batch_size, *train.images.shape[1:])
  assert batch["image"].dtype == np.int32 and batch["label"].dtype == np.int32
  rows = {r.tobytes() for r in train.images.astype(np.int32)}
  assert all(r.tobytes() in rows for r in batch["image"])
  evaluated = np.concatenate([b["image"] for b in data.eval_batches(test, batch_size=batch_size)])
  np.testing.assert_array_equal(evaluated, test.images)


def test_digits_split_is_fixed_1500_297_disjoint_and_in_vocab():
  train, test = data.load_source("digits", "train"), data.load_source("digits", "test")
  assert (len(train), len(test)) == (1500, 297)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 16 and train.images.min() == 0
  again = data.load_source("digits", "train")
  np.testing.assert_array_equal(train.images, again.images)
  rows = {r.tobytes() + bytes([label]) for r, label in zip(train.images, train.labels, strict=True)}
  assert not any(r.tobytes() + bytes([label]) in rows for r, label in zip(test.images, test.labels, strict=True))
  _assert_pipelines_read(train, test, batch_size=32)


def test_digits_read_from_sklearns_file_are_sklearns_load_digits_split_by_seed_0():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.images))
  for split, idx in (("train", order[:1500]), ("test", order[1500:])):
    source = data.load_digits(split)
    np.testing.assert_array_equal(source.images, digits.images[idx, :, :, None])
    np.testing.assert_array_equal(source.labels, digits.target[idx])
    assert source.images.dtype == source.labels.dtype == np.int32


def test_digits_without_sklearn_fail_naming_the_install(monkeypatch):
  monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(data.ConfigError, match=r"scikit-learn.*pip install -e '.\[train\]'"):
    data.load_digits("train")


def _shard(index, count):
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count)


def _take(iterator, count):
  return [next(iterator)["label"] for _ in range(count)]


def _saved_and_restored(tmp_path, data_state):
  """data_state through a real checkpoint (orbax + grain's handler) and back."""
  manager = checkpoints.make_manager(tmp_path / "checkpoints")
  checkpoints.save(manager, 1, {"w": np.zeros(2, np.float32)}, data_state)
  manager.wait_until_finished()
  _, _, restored = checkpoints.restore(manager, {"w": jax.ShapeDtypeStruct((2,), np.float32)})
  manager.close()
  return restored


@pytest.mark.parametrize("threads", [0, 3])
def test_resume_through_a_checkpoint_repeats_the_uninterrupted_batches(tmp_path, threads):
  source = _source(seed=7)
  expected = _take(data.train_iterator(source, batch_size=5, seed=3), 11)  # 4 per epoch
  first = data.train_iterator(source, batch_size=5, seed=3, num_threads=threads)
  _take(first, 6)
  restored = _saved_and_restored(tmp_path, first.get_state())
  assert restored == {"next_index": 6}
  resumed = data.train_iterator(source, batch_size=5, seed=3, num_threads=2 - threads // 3)
  resumed.set_state(restored)
  np.testing.assert_array_equal(_take(resumed, 5), expected[6:])


def test_state_saved_with_a_prefetched_batch_is_the_state_right_after_it(tmp_path):
  """The loop reads batches ahead: the state it saves after step k resumes at batch k + 1."""
  source = _source(n=40, seed=5)
  expected = _take(data.train_iterator(source, batch_size=4, seed=1), 12)
  identity = types.SimpleNamespace(global_batch=lambda batch: batch)
  queue = loop._prefetch_to_device(identity, data.train_iterator(source, batch_size=4, seed=1,
                                                                  prefetch_batches=6), 3)
  consumed = [next(queue) for _ in range(7)]
  for (batch, _), labels in zip(consumed, expected, strict=False):
    np.testing.assert_array_equal(batch["label"], labels)
  resumed = data.train_iterator(source, batch_size=4, seed=1)
  resumed.set_state(_saved_and_restored(tmp_path, consumed[-1][1]))
  np.testing.assert_array_equal(_take(resumed, 5), expected[7:])


def test_checkpointed_position_is_a_plain_grain_checkpoint(tmp_path):
  """grain's own CheckpointRestore of a live iterator reads what checkpoints.save wrote."""
  source = _source(n=30, seed=2)
  iterator = data.train_iterator(source, batch_size=3, seed=4)
  _take(iterator, 4)
  _saved_and_restored(tmp_path, iterator.get_state())
  expected = _take(iterator, 3)
  fresh = data.train_iterator(source, batch_size=3, seed=4)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                  item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  manager.close()
  np.testing.assert_array_equal(_take(fresh, 3), expected)


def test_checkpoint_of_two_processes_resumes_with_one_and_differing_positions_are_refused(
    tmp_path):
  data_dir = tmp_path / "checkpoints" / "1" / "data"
  _saved_and_restored(tmp_path, {"next_index": 9})
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  (data_dir / "process_1-of-2.json").write_text('{"next_index": 9}')
  manager = checkpoints.make_manager(tmp_path / "checkpoints")
  abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
  assert checkpoints.restore(manager, abstract)[2] == {"next_index": 9}
  (data_dir / "process_1-of-2.json").write_text('{"next_index": 8}')
  with pytest.raises(ValueError, match="different data positions for its 2 processes"):
    checkpoints.restore(manager, abstract, step=1)
  manager.close()


def test_each_epoch_is_one_pass_over_a_fresh_permutation():
  it = data.train_iterator(_source(n=20), batch_size=5, seed=0)
  epochs = [np.concatenate(_take(it, 4)) for _ in range(3)]
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.arange(20))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert it.get_state() == {"next_index": 12}
  uneven = data.train_iterator(_source(n=23), batch_size=5, seed=0)  # 3 left out per epoch
  for _ in range(2):
    labels = np.concatenate(_take(uneven, 4))
    assert len(np.unique(labels)) == 20


def test_process_slices_concatenate_to_the_single_process_batch():
  source = _source(seed=1)
  single = data.train_iterator(source, batch_size=6, seed=7)
  hosts = [data.train_iterator(source, batch_size=6, seed=7, shard_options=_shard(p, 3))
           for p in range(3)]
  for _ in range(5):
    whole = next(single)
    parts = [next(h) for h in hosts]
    assert all(len(p["label"]) == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
  assert {h.get_state()["next_index"] for h in hosts} == {5}


def test_iterator_rejects_batch_not_divisible_by_processes_or_larger_than_the_split():
  with pytest.raises(ValueError, match="multiple of the process count 4, got 6"):
    data.train_iterator(_source(), batch_size=6, seed=0, shard_options=_shard(0, 4))
  with pytest.raises(ValueError, match="has 23 examples, fewer than training.batch_size 24"):
    data.train_iterator(_source(), batch_size=24, seed=0)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_batches_visit_each_example_once_in_the_likelihood_numbering(count):
  source, batch = _source(n=23), 6
  shards = [list(data.eval_batches(source, batch_size=batch, shard_options=_shard(p, count)))
            for p in range(count)]
  assert len({len(s) for s in shards}) == 1  # every process takes part in every batch
  seen = []
  for p, batches in enumerate(shards):
    position = 0  # local position over the pass: example position * P + p
    for b in batches:
      np.testing.assert_array_equal(b["label"], (position + np.arange(len(b["label"]))) * count + p)
      position += len(b["label"])
      seen.extend(b["label"])
  np.testing.assert_array_equal(np.sort(seen), np.arange(23))  # last remainder 5 >= P: kept
  limited = list(data.eval_batches(source, batch_size=8, num_examples=10))
  assert [len(b["label"]) for b in limited] == [8, 2]


def test_eval_drops_a_last_remainder_smaller_than_the_process_count():
  shards = [list(data.eval_batches(_source(n=17), batch_size=8, shard_options=_shard(p, 4)))
            for p in range(4)]
  assert [len(s) for s in shards] == [2, 2, 2, 2]
  assert sorted(int(x) for s in shards for b in s for x in b["label"]) == list(range(16))


def test_categorical_baseline_matches_hand_computed_entropy():
  rng = np.random.default_rng(10)
  train = rng.integers(0, 3, (50, 2, 1, 1))
  test = rng.integers(0, 3, (7, 2, 1, 1))
  expected = 0.0
  for d in range(2):
    counts = np.bincount(train[:, d, 0, 0], minlength=3)
    p = (counts + 0.5) / (50 + 1.5)
    expected += -np.log2(p[test[:, d, 0, 0]]).sum()
  got = data.categorical_baseline_bpd(train, test, vocab_size=3, pseudocount=0.5)
  np.testing.assert_allclose(got, expected / (7 * 2), rtol=1e-12)


def test_categorical_baseline_of_uniform_data_is_log2_vocab():
  rng = np.random.default_rng(11)
  train = rng.integers(0, 16, (20000, 3, 1, 1))
  test = rng.integers(0, 16, (500, 3, 1, 1))
  np.testing.assert_allclose(data.categorical_baseline_bpd(train, test, vocab_size=16), 4.0,
                             atol=0.03)


def test_npz_with_held_out_fraction_and_with_explicit_test_arrays(tmp_path):
  rng = np.random.default_rng(12)
  images = rng.integers(0, 256, (40, 4, 4, 3)).astype(np.uint8)
  np.savez(tmp_path / "a.npz", image=images, label=np.arange(40))
  train = data.load_source("npz", "train", path=str(tmp_path / "a.npz"), test_fraction=0.25)
  test = data.load_source("npz", "test", path=str(tmp_path / "a.npz"), test_fraction=0.25)
  assert (len(train), len(test)) == (30, 10)
  np.testing.assert_array_equal(np.sort(np.concatenate([train.labels, test.labels])), np.arange(40))
  np.savez(tmp_path / "b.npz", image=images, test_image=images[:3])
  _assert_pipelines_read(train, test, batch_size=4)
  assert len(data.load_source("npz", "test", path=str(tmp_path / "b.npz"))) == 3
  np.savez(tmp_path / "c.npz", image=images.astype(np.float32))
  with pytest.raises(ValueError, match="integer"):
    data.load_source("npz", "train", path=str(tmp_path / "c.npz"))


def test_image_folder_resizes_crops_and_labels_by_subfolder(tmp_path):
  rng = np.random.default_rng(13)
  for cls in ("cats", "dogs"):
    (tmp_path / cls).mkdir()
    for i in range(5):
      pixels = rng.integers(0, 256, (12, 20, 3)).astype(np.uint8)
      Image.fromarray(pixels).save(tmp_path / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
  kwargs = dict(path=str(tmp_path), image_shape=(8, 8, 3), test_fraction=0.2)
  train = data.load_source("image_folder", "train", **kwargs)
  test = data.load_source("image_folder", "test", **kwargs)
  assert train.images.shape == (8, 8, 8, 3) and test.images.shape == (2, 8, 8, 3)
  assert sorted(np.concatenate([train.labels, test.labels]).tolist()) == [0] * 5 + [1] * 5
  _assert_pipelines_read(train, test, batch_size=4)
  grey = data.load_source("image_folder", "train", path=str(tmp_path), image_shape=(4, 4, 1))
  assert grey.images.shape[1:] == (4, 4, 1)


def test_tfds_dataset_reads_mocked_split():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    source = data.load_source("mnist", "test")
    batch = next(data.train_iterator(source, batch_size=4, seed=0, num_threads=2))
    (evaluated,) = list(data.eval_batches(source, batch_size=8))
  assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.int32
  assert batch["label"].shape == (4,)
  assert evaluated["image"].shape == (6, 28, 28, 1) and evaluated["label"].dtype == np.int32


def test_unprepared_tfds_dataset_fails_fast_naming_data_dir_and_fix(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}.*tfds build cifar10"):
    data.load_source("cifar10", "train", data_dir=str(tmp_path))


def test_unknown_dataset_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="unknown data.dataset 'cifar11'.*digits"):
    data.load_source("cifar11", "train")
