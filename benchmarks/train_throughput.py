r"""Training throughput: median step time and images/s of the real sharded train step.

Random integer images, the config's model and optimizer (AdamW + EMA), after
`--warmup` un-timed steps; each timed step waits for its result. Prints one
JSON line and appends it to benchmarks/results/train_throughput.jsonl.

  python benchmarks/train_throughput.py --config=configs/cifar10.py --batch_size=8
  python benchmarks/train_throughput.py --config=configs/cifar10.py --batch_size=64 \
      --preset=tiny_reference      # the reference fixture's 8x8x3 model
  python benchmarks/train_throughput.py --config=configs/cifar10.py --dtype=bfloat16
"""
import datetime
import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdm_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "cifar10.py"),
                                          "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Un-timed steps first (compilation included).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PRESET = flags.DEFINE_enum("preset", "none", ["none", "tiny_reference"],
                            "tiny_reference: 8x8x3, n_embd 32, n_layer 2, attention, Fourier "
                            "features, learned linear gamma (the reference fixture's model).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Skip the EMA update (ema_decay = 0).")
_OUT = flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "train_throughput.jsonl"),
                           "JSON-lines file to append to ('' = do not write).")


def _configure():
  config = _CONFIG.value
  if _PRESET.value == "tiny_reference":
    m = config.model
    m.image_shape, m.n_embd, m.n_layer = (8, 8, 3), 32, 2
    m.with_attention, m.with_fourier_features, m.schedule = True, True, "learned_linear"
    m.dropout = 0.0
  config.model.dtype = _DTYPE.value
  config.training.batch_size = _BATCH.value
  if _NO_EMA.value:
    config.optimizer.ema_decay = 0.0
  return config


def main(argv):
  del argv
  config = _configure()
  setup = train.Setup(config)
  state = setup.init_state()
  rng = np.random.default_rng(0)
  shape = (_BATCH.value // jax.process_count(), *setup.image_shape)
  batch = setup.global_batch({
      "image": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
      "label": rng.integers(0, max(1, config.model.num_classes), shape[:1], dtype=np.int32)})
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    state, metrics = setup.train_step(state, batch)
    jax.block_until_ready(metrics)
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  result = {
      "benchmark": "train_throughput",
      "config": os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]), ROOT),
      "preset": _PRESET.value, "batch_size": _BATCH.value, "dtype": _DTYPE.value,
      "ema": not _NO_EMA.value, "median_step_ms": round(step_s * 1e3, 2),
      "img_per_s": round(_BATCH.value / step_s, 2), "steps": _STEPS.value,
      "warmup": _WARMUP.value,
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "num_devices": jax.device_count(), "jax_version": jax.__version__,
      "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  line = json.dumps(result)
  print(line)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
