"""Datasets as integer NHWC numpy batches {"image": int32 [B,H,W,C], "label": int32 [B]}.

Sources are random-access (len + get(indices)); grain turns them into batches:
a global shuffle per epoch, per-process shards, reading on background threads
with batches prefetched ahead of the train step, and an iterator state
({"next_index": batches returned}) that the checkpoint stores through orbax's
grain support, so a resumed run sees exactly the batches of an uninterrupted
one. Training: every process computes the same global batch of indices and
reads only its contiguous slice of it (the global batch does not depend on the
number of processes). Evaluation: one pass in order, process p reading grain's
shard [p::P] (the numbering of vdm_jax.likelihood).

Sources: the embedded sklearn digits (fixed 1500/297 split, no download),
tfds named datasets read through `tfds.data_source` (array_record files, no
TensorFlow input pipeline), user `.npz` arrays and a folder of PNG/JPEG files.
"""
import dataclasses
import importlib.util
import os
import pathlib
from typing import Any, Iterator, Optional, Union

from absl import logging
import grain
import numpy as np

from vdm_jax.train.errors import ConfigError

# name -> (tfds name, train split, test split)
TFDS_DATASETS = {
    "mnist": ("mnist", "train", "test"),
    "fashion_mnist": ("fashion_mnist", "train", "test"),
    "cifar10": ("cifar10", "train", "test"),
    "imagenet32": ("imagenet_resized/32x32", "train", "validation"),
    "imagenet64": ("imagenet_resized/64x64", "train", "validation"),
}
LOCAL_DATASETS = ("digits", "npz", "image_folder")
DATASETS = tuple(TFDS_DATASETS) + LOCAL_DATASETS
DIGITS_NUM_TRAIN = 1500
NUM_THREADS = 4        # default data.num_threads: background threads reading batches
PREFETCH_BATCHES = 8   # default data.prefetch_batches: batches read ahead of the train step
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """In-memory random-access source: images int [N,H,W,C], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self):
    return len(self.images)

  def get(self, indices):
    """Returns {"image": int32 [len(indices),H,W,C], "label": int32 [...]}."""
    return {"image": self.images[indices].astype(np.int32),
            "label": self.labels[indices].astype(np.int32)}


class TfdsSource:
  """Random-access view of one split of a prepared tfds dataset (array_record)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def get(self, indices):
    """Returns {"image": int32 [len(indices),H,W,C], "label": int32 [...]}."""
    examples = [self._source[int(i)] for i in indices]
    return {"image": np.stack([e["image"] for e in examples]).astype(np.int32),
            "label": np.asarray([e.get("label", 0) for e in examples], np.int32)}


Source = Union[ArraySource, TfdsSource]  # random access: len(source), source.get(indices)


def _sklearn_digits_file() -> pathlib.Path:
  """sklearn/datasets/data/digits.csv.gz, found without importing sklearn (2 s of CPU)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("data.dataset='digits' reads the digits bundled with scikit-learn, "
                      "which is not installed: pip install -e '.[train]'")
  return pathlib.Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def load_digits(split: str) -> ArraySource:
  """sklearn.datasets.load_digits()'s 8x8 digits (values 0..16, vocab 17) as an ArraySource,
  split by a permutation with seed 0: first 1500 "train", the other 297 "test"."""
  table = np.loadtxt(_sklearn_digits_file(), delimiter=",")
  images = table[:, :-1].astype(np.int32).reshape(-1, 8, 8, 1)
  order = np.random.default_rng(0).permutation(len(images))
  idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
  return ArraySource(images[idx], table[idx, -1].astype(np.int32))


def _held_out(images, labels, split, *, test_fraction, split_seed):
  """Fixed train/test split of in-memory arrays by a seeded permutation."""
  if not 0.0 < test_fraction < 1.0:
    raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
  order = np.random.default_rng(split_seed).permutation(len(images))
  num_test = max(1, int(round(test_fraction * len(images))))
  idx = order[num_test:] if split == "train" else order[:num_test]
  return ArraySource(images[idx], labels[idx])


def load_npz(path, split, *, test_fraction=0.1, split_seed=0):
  """User arrays: an .npz with "image" int [N,H,W,C] (and optional "label" [N]).

  If the file also holds "test_image" (and "test_label") those form the test
  split; otherwise a fixed `test_fraction` of "image" is held out.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"data.path must name an .npz file, got {path!r} (not a file)")
  try:
    with np.load(path) as arrays:
      arrays = dict(arrays)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"data.path {path!r} is not a readable .npz file "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
  if not isinstance(arrays, dict):
    raise ConfigError(f"data.path {path!r} is a single array, not an .npz archive of arrays")
  if "image" not in arrays:
    raise ConfigError(f"{path} must contain an 'image' array [N,H,W,C], found keys {sorted(arrays)}")
  for key in ("image", "test_image"):
    if key in arrays and (arrays[key].ndim != 4 or not np.issubdtype(arrays[key].dtype, np.integer)):
      raise ConfigError(f"{path}:{key} must be an integer [N,H,W,C] array, "
                       f"got {arrays[key].dtype} {arrays[key].shape}")
  labels = arrays.get("label", np.zeros(len(arrays["image"]), np.int32))
  if "test_image" in arrays:
    if split == "train":
      return ArraySource(arrays["image"], labels)
    test = arrays["test_image"]
    return ArraySource(test, arrays.get("test_label", np.zeros(len(test), np.int32)))
  return _held_out(arrays["image"], labels, split,
                   test_fraction=test_fraction, split_seed=split_seed)


def _load_image(path, height, width, channels):
  """Resizes the shorter side to fit (height, width), then centre-crops."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    image = image.convert("L" if channels == 1 else "RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, np.int32).reshape(height, width, channels)


def load_image_folder(path, split, *, image_shape, test_fraction=0.1, split_seed=0):
  """Every PNG/JPEG under `path`; label = index of its sorted sub-folder (0 at top level).

  Images are resized (shorter side) and centre-cropped to image_shape (H, W, C);
  C = 1 converts to grey, C = 3 to RGB. A fixed `test_fraction` is held out.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise ConfigError(f"data.path must name a folder of images, got {path!r} (not a folder)")
  files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
  if len(files) < 2:
    raise ConfigError(f"data.path {path!r} holds {len(files)} PNG/JPEG files; need at least 2")
  height, width, channels = image_shape
  if channels not in (1, 3):
    raise ConfigError(f"image_folder needs model.image_shape C in (1, 3), got {channels}")
  folders = sorted({p.parent for p in files})
  labels = np.asarray([folders.index(p.parent) for p in files], np.int32)
  images = np.stack([_load_image(p, height, width, channels) for p in files])
  return _held_out(images, labels, split, test_fraction=test_fraction, split_seed=split_seed)


def load_tfds(name, split, *, data_dir=None):
  """A split of a prepared tfds dataset, without downloading.

  Fails at once when the array_record files are missing, naming data_dir and
  the command that prepares them.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_name, train_split, test_split = TFDS_DATASETS[name]
  try:
    source = tfds.data_source(tfds_name, split=train_split if split == "train" else test_split,
                              data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise ConfigError(
        f"dataset {tfds_name!r} is not prepared as array_record in data_dir {where} "
        f"({type(e).__name__}); prepare it with: tfds build {tfds_name} "
        f"--data_dir={where} --file_format=array_record") from None
  return TfdsSource(source)


def load_source(dataset, split, *, data_dir="", path="", image_shape=(32, 32, 3),
                test_fraction=0.1, split_seed=0):
  """Returns the random-access source of `dataset`'s "train" or "test" split."""
  if split not in ("train", "test"):
    raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
  if dataset == "digits":
    return load_digits(split)
  if dataset == "npz":
    return load_npz(path, split, test_fraction=test_fraction, split_seed=split_seed)
  if dataset == "image_folder":
    return load_image_folder(path, split, image_shape=image_shape,
                             test_fraction=test_fraction, split_seed=split_seed)
  if dataset in TFDS_DATASETS:
    return load_tfds(dataset, split, data_dir=data_dir)
  raise ConfigError(f"unknown data.dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def check_source(source, *, split, image_shape, vocab_size, num_classes=0):
  """ValueError unless the images are int [N, *image_shape] in [0, vocab_size) and labels fit.

  In-memory sources are checked whole; other sources on their first 8 examples.
  Labels must lie in [0, num_classes) when num_classes > 0.
  """
  if isinstance(source, ArraySource):
    images, labels = source.images, source.labels
  else:
    sample = source.get(np.arange(min(8, len(source))))
    images, labels = sample["image"], sample["label"]
  images, labels = np.asarray(images), np.asarray(labels)
  where = f"the {split} images"
  if len(images) == 0:
    raise ConfigError(f"{where} are empty")
  if tuple(images.shape[1:]) != tuple(image_shape):
    raise ConfigError(f"{where} have shape {tuple(images.shape[1:])} but model.image_shape is "
                     f"{tuple(image_shape)}")
  if not np.issubdtype(images.dtype, np.integer):
    raise ConfigError(f"{where} must be integers in [0, {vocab_size}), got dtype {images.dtype}")
  low, high = int(images.min()), int(images.max())
  if low < 0 or high >= vocab_size:
    raise ConfigError(f"{where} have values in [{low}, {high}] but model.vocab_size={vocab_size} "
                     f"needs them in [0, {vocab_size - 1}]")
  if num_classes > 0 and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(f"the {split} labels lie in [{labels.min()}, {labels.max()}] but "
                     f"model.num_classes={num_classes} needs them in [0, {num_classes - 1}]")


def _shard(shard_options):
  return grain.sharding.ShardByJaxProcess() if shard_options is None else shard_options


def _read_options(num_threads, prefetch_batches):
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)


def _check_batch_size(name, batch_size, shard):
  if batch_size <= 0 or batch_size % shard.shard_count:
    raise ConfigError(f"{name} must be a positive multiple of the process count "
                      f"{shard.shard_count}, got {batch_size}")


class _ReadSlice:
  """Reads this process's contiguous part [start, stop) of a global batch of indices."""

  def __init__(self, source, start, stop):
    self._source, self._start, self._stop = source, start, stop

  def __call__(self, indices):
    return self._source.get(indices[self._start:self._stop])


def train_dataset(source: Source, *, batch_size: int, seed: int,
                  shard_options: Optional[grain.sharding.ShardOptions] = None
                  ) -> grain.MapDataset:
  """Endless shuffled training batches as a grain MapDataset (element b: global batch b).

  Epoch e is grain's global shuffle of range(N) with seed `seed + e`; its global
  batch i is shuffled[i*B:(i+1)*B] (the last partial batch is dropped), N // B
  batches per epoch. Process p of P (shard_options, default grain's
  ShardByJaxProcess) reads only its contiguous B/P part [p*B/P, (p+1)*B/P) of
  each global batch, so the global batch, and a run's numbers, do not depend on P.

  Args:
    source: random-access source (len, get(indices) -> {"image", "label"}).
    batch_size: B, the global batch; a multiple of P.
    seed: shuffle seed (taken modulo 2**32).
    shard_options: grain.sharding.ShardOptions (shard_index p, shard_count P).

  Returns:
    grain.MapDataset of {"image": int32 [B/P, H, W, C], "label": int32 [B/P]}.
  """
  shard = _shard(shard_options)
  _check_batch_size("training.batch_size", batch_size, shard)
  if len(source) < batch_size:
    raise ConfigError(f"the training split has {len(source)} examples, fewer than "
                      f"training.batch_size {batch_size}")
  local = batch_size // shard.shard_count
  read = _ReadSlice(source, shard.shard_index * local, (shard.shard_index + 1) * local)
  return (grain.MapDataset.range(len(source)).shuffle(seed=int(seed) % 2**32)
          .batch(batch_size, drop_remainder=True).repeat().map(read))


def train_iterator(source: Source, *, batch_size: int, seed: int,
                   shard_options: Optional[grain.sharding.ShardOptions] = None,
                   num_threads: int = NUM_THREADS, prefetch_batches: int = PREFETCH_BATCHES
                   ) -> grain.DatasetIterator:
  """Iterator over train_dataset's batches, read by `num_threads` background threads.

  Up to `prefetch_batches` batches are read ahead (0 threads or 0 batches: read
  on the calling thread). get_state() is {"next_index": number of batches
  returned}, the same on every process; set_state(state) resumes after them
  exactly, whatever the number of threads.

  Returns:
    grain.DatasetIterator of {"image": int32 [B/P, H, W, C], "label": int32 [B/P]}.
  """
  dataset = train_dataset(source, batch_size=batch_size, seed=seed, shard_options=shard_options)
  return iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch_batches)))


def _eval_total(num_examples, length, batch_size, process_count):
  """Examples evaluated: the first num_examples (0: all), less a last remainder smaller than P."""
  total = length if num_examples <= 0 else min(num_examples, length)
  remainder = total % batch_size
  if process_count > 1 and 0 < remainder < process_count:
    logging.warning("dropping the last %d eval examples (fewer than %d processes)",
                    remainder, process_count)
    total -= remainder
  return total


def eval_batches(source: Source, *, batch_size: int, num_examples: int = 0,
                 shard_options: Optional[grain.sharding.ShardOptions] = None,
                 num_threads: int = NUM_THREADS, prefetch_batches: int = PREFETCH_BATCHES
                 ) -> Iterator[dict[str, Any]]:
  """One deterministic pass in order over the first num_examples (0: all) examples.

  Process p of P keeps grain's shard range(total)[p::P] and batches it by B/P, so
  local position j of process p in global batch b is example b*B + j*P + p, the
  numbering that vdm_jax.likelihood uses: the evaluation does not depend on P.
  The last batch may be smaller; with several processes a final remainder
  smaller than P is dropped. Batches are read ahead on background threads.

  Returns:
    iterator of {"image": int32 [<= B/P, H, W, C], "label": int32 [<= B/P]}.
  """
  shard = _shard(shard_options)
  _check_batch_size("eval batch_size", batch_size, shard)
  total = _eval_total(num_examples, len(source), batch_size, shard.shard_count)
  dataset = (grain.MapDataset.range(total)[shard.shard_index::shard.shard_count]
             .batch(batch_size // shard.shard_count).map(source.get))
  return _closing(iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch_batches))))


def _closing(iterator):
  """Yields the iterator's elements, then stops its reading threads."""
  try:
    yield from iterator
  finally:
    iterator.close()


def categorical_baseline(sources: dict, vocab_size: int):
  """Per-pixel categorical baseline (test bits/dim) when both splits are in memory, else None."""
  train, test = sources["train"], sources["test"]
  if isinstance(train, ArraySource) and isinstance(test, ArraySource):
    return categorical_baseline_bpd(train.images, test.images, vocab_size=vocab_size)
  return None


def categorical_baseline_bpd(train_images, test_images, *, vocab_size, pseudocount=1.0):
  r"""Test bits/dim of independent per-pixel categoricals fitted on the train split.

  p_d(v) = (n_d(v) + a) / (N + a V) for each dimension d (add-a smoothing), and
  bits/dim = -mean_{n, d} log2 p_d(x_{n,d}) over the test images.

  Args:
    train_images: int [N, H, W, C] in [0, vocab_size).
    test_images: int [M, H, W, C] in [0, vocab_size).
    vocab_size: V.
    pseudocount: a > 0.

  Returns:
    float, bits per dimension on test_images.
  """
  train = np.asarray(train_images).reshape(len(train_images), -1)
  test = np.asarray(test_images).reshape(len(test_images), -1)
  if train.shape[1] != test.shape[1]:
    raise ConfigError(f"train and test images differ in size: {train.shape} vs {test.shape}")
  dims = np.arange(train.shape[1])
  counts = np.zeros((train.shape[1], vocab_size))
  np.add.at(counts, (np.broadcast_to(dims, train.shape), train), 1.0)
  logp = np.log2(counts + pseudocount) - np.log2(len(train) + pseudocount * vocab_size)
  return float(-logp[dims[None, :], test].mean())


def load_sources(config, splits=("train", "test")) -> dict:
  """{split: random-access source} for config.data, each checked against config.model."""
  d, m = config.data, config.model
  sources = {split: load_source(d.dataset, split, data_dir=d.data_dir, path=d.path,
                                image_shape=tuple(m.image_shape), test_fraction=d.test_fraction,
                                split_seed=d.split_seed)
             for split in splits}
  for split, source in sources.items():
    check_source(source, split=split, image_shape=tuple(m.image_shape),
                 vocab_size=m.vocab_size, num_classes=m.num_classes)
  return sources
