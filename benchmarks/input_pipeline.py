r"""Input pipeline throughput: batches/s and images/s of the trainer's grain pipeline.

Writes a CIFAR-10-sized tfds dataset (ArrayRecord, PNG-encoded random 32x32x3
images with labels, the format `tfds build cifar10 --file_format=array_record`
writes) under a temporary folder, then reads it the way training does
(tfds.data_source -> vdm_jax.train.data.train_iterator: grain's global shuffle,
batches read by background threads and prefetched) with 0 (in the loop), 1, 2
and 4 reading threads. Every image is a fresh random one, so PNG decoding costs
what it costs on real CIFAR-10 (random pixels compress worst: an upper bound).
Prints a table next to what the train step consumes, and appends one JSON line
per thread count to benchmarks/results/input_pipeline.jsonl.

  python benchmarks/input_pipeline.py                     # 50,000 images, batch 128
  python benchmarks/input_pipeline.py --num_images=10000  # same per-image cost, faster
"""
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import machine  # benchmarks/machine.py: a script's own folder is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdm_jax.train import data  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer("num_images", 50_000, "Images written (CIFAR-10: 50,000).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch (the CIFAR-10 config's).")
_BATCHES = flags.DEFINE_integer("batches", 60, "Timed batches per thread count.")
_THREADS = flags.DEFINE_list("threads", ["0", "1", "2", "4"], "Reading thread counts.")
_PREFETCH = flags.DEFINE_integer("prefetch_batches", data.PREFETCH_BATCHES,
                                 "Batches read ahead (data.prefetch_batches).")
_OUT = flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "input_pipeline.jsonl"),
                           "JSON-lines file to append to ('' = do not write).")

# What the train step consumes (images/s); measured on the 2-core CPU machine of
# this project (README) and the DDPM paper's TPU figure (Ho et al. 2020, app. B:
# 21 steps/s at batch 128 on a TPU v3-8).
DEMAND = (
    ("CIFAR-10 paper config, this CPU (batch 8, ~5.5 s/step)", 8 / 5.5),
    ("digits demo, this CPU (batch 32, ~17 steps/s, in memory)", 17 * 32),
    ("DDPM CIFAR-10 on a TPU v3-8 (batch 128, 21 steps/s)", 2690.0),
)


def write_dataset(data_dir, num_images, *, seed=0):
  """A tfds dataset "random_cifar" (train split) of num_images PNG 32x32x3 images in data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
      "label": tfds.features.ClassLabel(num_classes=10)})

  def examples():
    rng = np.random.default_rng(seed)
    for i in range(num_images):
      yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                "label": int(rng.integers(10))}
  tfds.dataset_builders.store_as_tfds_dataset(
      name="random_cifar", version="1.0.0", features=features,
      split_datasets={"train": examples()}, data_dir=data_dir, file_format="array_record")
  return data.TfdsSource(tfds.data_source("random_cifar", split="train", data_dir=data_dir))


def measure(source, *, threads, batch_size, batches, prefetch_batches):
  """(batches/s, images/s, first batch s) of train_iterator with `threads` reading threads.

  The clock starts after the first batch (thread start-up and the first reads)
  and stops at the last of `batches` more; a train step taking no time is
  assumed, so this is the most the pipeline can deliver.
  """
  start = time.perf_counter()
  iterator = data.train_iterator(source, batch_size=batch_size, seed=0, num_threads=threads,
                                 prefetch_batches=prefetch_batches)
  next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  iterator.close()
  assert batch["image"].shape == (batch_size, 32, 32, 3)
  return batches / elapsed, batches * batch_size / elapsed, first


def _table(rows, num_images, batch_size):
  lines = [f"input pipeline: {num_images} PNG 32x32x3 images (tfds ArrayRecord), batch "
           f"{batch_size}, prefetch {_PREFETCH.value} batches",
           f"{'reading threads':>16} {'batches/s':>10} {'images/s':>10} {'first batch s':>14}"]
  for row in rows:
    lines.append(f"{row['threads']:>16} {row['batches_per_s']:>10.2f} "
                 f"{row['images_per_s']:>10.0f} {row['first_batch_s']:>14.2f}")
  best = max(rows, key=lambda r: r["images_per_s"])
  lines.append("what the train step consumes:")
  for name, images_per_s in DEMAND:
    verdict = ("keeps up" if best["images_per_s"] >= images_per_s else
               f"short by {images_per_s / best['images_per_s']:.1f}x")
    lines.append(f"  {name}: {images_per_s:,.1f} images/s -> best reader "
                 f"({best['threads']} threads, {best['images_per_s']:,.0f} images/s) {verdict}")
  return "\n".join(lines)


def main(argv):
  del argv
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="vdm_input_pipeline_") as tmp:
    start = time.perf_counter()
    source = write_dataset(tmp, _NUM_IMAGES.value)
    write_s = time.perf_counter() - start
    rows = []
    for threads in (int(t) for t in _THREADS.value):
      batches_per_s, images_per_s, first = measure(
          source, threads=threads, batch_size=_BATCH.value, batches=_BATCHES.value,
          prefetch_batches=_PREFETCH.value)
      rows.append({"threads": threads, "batches_per_s": round(batches_per_s, 3),
                   "images_per_s": round(images_per_s, 1), "first_batch_s": round(first, 3)})
  print(_table(rows, _NUM_IMAGES.value, _BATCH.value))
  common = {"benchmark": "input_pipeline", "num_images": _NUM_IMAGES.value,
            "batch_size": _BATCH.value, "timed_batches": _BATCHES.value,
            "prefetch_batches": _PREFETCH.value, "write_s": round(write_s, 1), **machine.describe(),
            "load_avg_1m_before": round(load_before, 2)}
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      for row in rows:
        f.write(json.dumps({**common, **row}) + "\n")
    print(f"appended {len(rows)} lines to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
