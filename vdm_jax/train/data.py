"""Datasets as integer NHWC numpy batches {"image": int32 [B,H,W,C], "label": int32 [B]}.

Sources are random-access (len + integer indexing), so the training iterator
is a pure function of (seed, epoch, index): its state is two ints that a
checkpoint stores, and a resumed run sees exactly the batches of an
uninterrupted one. Every host draws the same global permutation and keeps its
own contiguous slice of each global batch.

Sources: the embedded sklearn digits (fixed 1500/297 split, no download),
tfds named datasets read through `tfds.data_source` (array_record files, no
TensorFlow input pipeline), user `.npz` arrays and a folder of PNG/JPEG files.
"""
import dataclasses
import os
import pathlib
from typing import Any, Iterator

from absl import logging
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


def load_digits(split):
  """sklearn's bundled 8x8 digits (values 0..16, vocab 17) as an ArraySource.

  The split is fixed: a permutation with seed 0, first 1500 for "train", the
  remaining 297 for "test".
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.int32)[..., None]
  order = np.random.default_rng(0).permutation(len(images))
  idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
  return ArraySource(images[idx], digits.target[idx].astype(np.int32))


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


def _host_slice(global_batch, process_index, process_count):
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


class TrainIterator:
  """Endless shuffled batches; the state {"epoch", "index"} restores the position.

  Epoch e uses the permutation of np.random.default_rng([seed, e]); global
  batch i of it is perm[i*B:(i+1)*B] (the last partial batch is dropped), and
  process p of P yields its contiguous B/P slice of it.
  """

  def __init__(self, source, *, batch_size, seed, process_index=0, process_count=1):
    if batch_size <= 0 or batch_size % process_count:
      raise ConfigError(f"batch_size must be a positive multiple of the process count "
                       f"{process_count}, got {batch_size}")
    if len(source) < batch_size:
      raise ConfigError(f"the training split has {len(source)} examples, fewer than "
                       f"training.batch_size {batch_size}")
    self._source, self._batch_size, self._seed = source, batch_size, seed
    self._slice = _host_slice(batch_size, process_index, process_count)
    self.epoch, self.index = 0, 0
    self._perm_epoch, self._perm = None, None

  @property
  def batches_per_epoch(self):
    return len(self._source) // self._batch_size

  def get_state(self):
    """Position as plain ints: {"epoch": int, "index": int}."""
    return {"epoch": int(self.epoch), "index": int(self.index)}

  def set_state(self, state):
    """Restores a position saved by get_state."""
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    if self.index >= self.batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    if self._perm_epoch != self.epoch:
      rng = np.random.default_rng([self._seed, self.epoch])
      self._perm, self._perm_epoch = rng.permutation(len(self._source)), self.epoch
    start = self.index * self._batch_size
    indices = self._perm[start:start + self._batch_size][self._slice]
    self.index += 1
    return self._source.get(indices)


def eval_batches(source, *, batch_size, num_examples=0, process_index=0,
                 process_count=1) -> Iterator[dict[str, Any]]:
  """One deterministic pass in order over the first num_examples (0: all) examples.

  Global batch b covers examples [b*B, (b+1)*B); process p of P yields every
  P-th of them starting at the p-th (the last batch may be smaller), so local
  position j of process p is example b*B + j*P + p, the numbering that
  vdm_jax.likelihood uses: the evaluation does not depend on P. With several
  processes a final remainder smaller than P is dropped.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ConfigError(f"eval batch_size must be a positive multiple of the process count "
                     f"{process_count}, got {batch_size}")
  total = len(source) if num_examples <= 0 else min(num_examples, len(source))
  for start in range(0, total, batch_size):
    indices = np.arange(start, min(start + batch_size, total))
    if len(indices) < process_count:
      logging.warning("dropping the last %d eval examples (fewer than %d processes)",
                      len(indices), process_count)
      return
    yield source.get(indices[process_index::process_count])


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
