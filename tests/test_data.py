"""Tests of vdm_jax.data: sources, the resumable sharded iterator, eval passes, baseline."""
import numpy as np
from PIL import Image
import pytest

from vdm_jax.train import data


def _source(n=23, shape=(4, 4, 1), seed=None):
  rng = np.random.default_rng(seed)
  return data.ArraySource(rng.integers(0, 256, (n, *shape)), np.arange(n, dtype=np.int32))


def test_digits_split_is_fixed_1500_297_disjoint_and_in_vocab():
  train, test = data.load_source("digits", "train"), data.load_source("digits", "test")
  assert (len(train), len(test)) == (1500, 297)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 16 and train.images.min() == 0
  again = data.load_source("digits", "train")
  np.testing.assert_array_equal(train.images, again.images)
  rows = {r.tobytes() + bytes([label]) for r, label in zip(train.images, train.labels, strict=True)}
  assert not any(r.tobytes() + bytes([label]) in rows for r, label in zip(test.images, test.labels, strict=True))


def test_iterator_resumed_from_saved_state_repeats_the_uninterrupted_batches():
  source = _source(seed=np.random.randint(1 << 30))
  full = data.TrainIterator(source, batch_size=5, seed=3)
  batches = [next(full)["label"] for _ in range(11)]  # 4 batches per epoch: crosses 2 epochs
  first = data.TrainIterator(source, batch_size=5, seed=3)
  for _ in range(6):
    next(first)
  resumed = data.TrainIterator(source, batch_size=5, seed=3)
  resumed.set_state(dict(first.get_state()))
  for expected in batches[6:]:
    np.testing.assert_array_equal(next(resumed)["label"], expected)


def test_iterator_epochs_are_permutations_and_differ_between_epochs():
  it = data.TrainIterator(_source(n=20), batch_size=5, seed=0)
  epochs = [np.concatenate([next(it)["label"] for _ in range(4)]) for _ in range(2)]
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.arange(20))
  assert not np.array_equal(epochs[0], epochs[1])
  assert it.get_state() == {"epoch": 1, "index": 4}


def test_process_slices_concatenate_to_the_single_process_batch():
  source = _source(seed=1)
  single = data.TrainIterator(source, batch_size=6, seed=7)
  hosts = [data.TrainIterator(source, batch_size=6, seed=7, process_index=p, process_count=3)
           for p in range(3)]
  for _ in range(5):
    whole = next(single)
    parts = [next(h) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])


def test_iterator_rejects_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="multiple of the process count 4"):
    data.TrainIterator(_source(), batch_size=6, seed=0, process_count=4)


def test_eval_batches_visit_each_example_once_across_processes():
  source = _source(n=23)
  for count in (1, 2):
    labels = [np.concatenate(list(parts)) for parts in zip(*[
        [b["label"] for b in data.eval_batches(source, batch_size=8, process_index=p,
                                              process_count=count)] for p in range(count)], strict=True)]
    np.testing.assert_array_equal(np.sort(np.concatenate(labels)), np.arange(23))
  limited = list(data.eval_batches(source, batch_size=8, num_examples=10))
  assert [len(b["label"]) for b in limited] == [8, 2]


def test_categorical_baseline_matches_hand_computed_entropy():
  rng = np.random.default_rng()
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
  rng = np.random.default_rng()
  train = rng.integers(0, 16, (20000, 3, 1, 1))
  test = rng.integers(0, 16, (500, 3, 1, 1))
  np.testing.assert_allclose(data.categorical_baseline_bpd(train, test, vocab_size=16), 4.0,
                             atol=0.03)


def test_npz_with_held_out_fraction_and_with_explicit_test_arrays(tmp_path):
  rng = np.random.default_rng()
  images = rng.integers(0, 256, (40, 4, 4, 3)).astype(np.uint8)
  np.savez(tmp_path / "a.npz", image=images, label=np.arange(40))
  train = data.load_source("npz", "train", path=str(tmp_path / "a.npz"), test_fraction=0.25)
  test = data.load_source("npz", "test", path=str(tmp_path / "a.npz"), test_fraction=0.25)
  assert (len(train), len(test)) == (30, 10)
  np.testing.assert_array_equal(np.sort(np.concatenate([train.labels, test.labels])), np.arange(40))
  np.savez(tmp_path / "b.npz", image=images, test_image=images[:3])
  assert len(data.load_source("npz", "test", path=str(tmp_path / "b.npz"))) == 3
  np.savez(tmp_path / "c.npz", image=images.astype(np.float32))
  with pytest.raises(ValueError, match="integer"):
    data.load_source("npz", "train", path=str(tmp_path / "c.npz"))


def test_image_folder_resizes_crops_and_labels_by_subfolder(tmp_path):
  rng = np.random.default_rng()
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
  grey = data.load_source("image_folder", "train", path=str(tmp_path), image_shape=(4, 4, 1))
  assert grey.images.shape[1:] == (4, 4, 1)


def test_tfds_dataset_reads_mocked_split():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    source = data.load_source("mnist", "test")
    it = data.TrainIterator(source, batch_size=4, seed=0)
    batch = next(it)
  assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.int32
  assert batch["label"].shape == (4,)


def test_unprepared_tfds_dataset_fails_fast_naming_data_dir_and_fix(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}.*tfds build cifar10"):
    data.load_source("cifar10", "train", data_dir=str(tmp_path))


def test_unknown_dataset_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="unknown data.dataset 'cifar11'.*digits"):
    data.load_source("cifar11", "train")
