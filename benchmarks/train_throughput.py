r"""Compile time, memory, step time, FLOP utilisation and loop overhead of every config.

For each config in configs/ (and the reference fixture's tiny model) a fresh
subprocess measures, at a per-config batch size that fits this CPU:
  * net_compile_s / net_step_ms: the bare network's forward + backward
    (jit(grad) of sum(eps_hat^2) over the parameters, dropout on), lower + compile
    seconds and median time;
  * step_compile_s / step_ms: the whole train step (loss, gradient, non-finite
    guard, AdamW, EMA), lower + compile seconds (Setup.compiled_train_step: its two
    programs, compiled side by side) and median time, images/s;
  * step_over_net: step_ms / net_step_ms (the reference code measures 1.11 here);
  * compile_ratio: step_compile_s / net_compile_s;
  * gflop_per_step, tflops_per_device and MFU (against the device's bf16 peak from
    vdm_jax.train.performance; "n/a" on CPU);
  * peak_rss_gb (the subprocess's peak resident memory) and the device's
    peak_bytes_in_use where the backend reports memory_stats() (GPU/TPU);
  * with --loop (default for digits and the fixture model): steps/s of the real
    training loop (train_and_evaluate, logged train/steps_per_sec) against the bare
    jitted step dispatched back to back, loop_over_bare. The bare rate is taken just
    before and just after the loop and averaged: on a shared machine it drifts by
    10 % or more within a minute.
Results print as a table and append as JSON lines (device, jax version, load average)
to benchmarks/results/train_throughput.jsonl. Runs unchanged on GPU/TPU.
Each config runs on its own config.cpu_devices CPU devices (train.use_cpu_devices, as
main.py); --cpu_devices=1,2 measures each config at each of those counts in turn (the bare
network's figures stay on one device).

  python benchmarks/train_throughput.py                        # every config
  python benchmarks/train_throughput.py --only=cifar10,digits  # some
  python benchmarks/train_throughput.py --only=digits,digits_long --cpu_devices=1,2,1,2
"""
import argparse
import itertools
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import machine  # benchmarks/machine.py: a script's own folder is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_throughput.jsonl"
# name -> (batch size, timed steps, measure the real loop) on a 2-core CPU.
PLAN = {
    "fixture_tiny": (64, 20, True), "digits": (32, 30, True), "digits_long": (64, 20, False),
    "digits_cond": (32, 30, False),
    "mnist": (16, 5, False), "fashion_mnist": (16, 5, False), "image_folder": (8, 3, False),
    "cifar10": (8, 5, False), "imagenet32": (4, 3, False), "imagenet64": (2, 3, False),
}


def _config(name, batch_size):
  """The config of `name` (configs/<name>.py, or the fixture's tiny model) at batch_size."""
  import importlib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  if name == "fixture_tiny":  # tests/fixtures/vdm_reference: 8x8x3, 32 x 2 blocks, attention
    config = importlib.import_module("configs.cifar10").get_config()
    m = config.model
    m.image_shape, m.n_embd, m.n_layer, m.with_attention, m.dropout = (8, 8, 3), 32, 2, True, 0.0
  else:
    config = importlib.import_module(f"configs.{name}").get_config()
  config.training.batch_size = config.eval.batch_size = batch_size
  return config


def _median(values):
  return sorted(values)[len(values) // 2]


def _interleaved_ms(net_fn, step_fn, rounds):
  """(median net ms, median step ms, median of the per-round step/net ratios).

  Each round times one network call and then one train step, so both see the same
  machine speed: on a shared machine the speed drifts by 10 % or more within minutes,
  which two back-to-back blocks of calls would read as a ratio.
  """
  net_s, step_s = [], []
  for _ in range(rounds):
    for fn, times in ((net_fn, net_s), (step_fn, step_s)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  ratios = [s / n for s, n in zip(step_s, net_s, strict=True)]
  return 1e3 * _median(net_s), 1e3 * _median(step_s), _median(ratios)


def _network(setup, params, batch_size):
  """(lower + compile s, median ms) of jit(grad) of the bare network, dropout on."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model, labels = setup.model, None
  if setup.conditional:
    labels = jnp.zeros((batch_size,), jnp.int32)

  def loss(params, z, gamma, key):
    eps_hat = model.network.apply({"params": params["score_model"]}, z, gamma, None, labels,
                                  train=True, rngs={"dropout": key})
    return jnp.sum(jnp.square(eps_hat.astype(jnp.float32)))

  args = (params, jnp.ones((batch_size, *setup.image_shape)), jnp.zeros((batch_size,)),
          jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  return compile_s, compiled, args


def _bare_rate(step, state, batch, steps):
  """(newest state, steps/s) of the compiled step dispatched back to back `steps` times.

  At most loop.STEPS_IN_FLIGHT steps are queued, as in the training loop.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vdm_jax.train import loop  # pylint: disable=g-import-not-at-top
  in_flight = collections.deque()
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
    loop.wait_for_older_steps(in_flight, metrics)  # as the training loop
  jax.block_until_ready(metrics)
  return state, steps / (time.perf_counter() - start)


def measure(name, batch_size, steps, loop, cpu_devices=None):
  """One config's figures (runs inside its own subprocess); cpu_devices None: the config's."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  from vdm_jax.train import performance  # pylint: disable=g-import-not-at-top
  config = _config(name, batch_size)
  if cpu_devices is not None:
    config.cpu_devices = cpu_devices
  train.use_cpu_devices(config.cpu_devices)  # before JAX's first operation, as main.py
  setup = train.Setup(config)
  state = setup.init_state()
  # A copy: the train step donates (deletes) state.params, and the network is timed
  # between steps.
  net_params = jax.tree.map(lambda x: x.copy(), state.params)
  net_compile_s, net, net_args = _network(setup, net_params, batch_size)
  start = time.perf_counter()
  step, flops = setup.compiled_train_step()
  step_compile_s = time.perf_counter() - start
  rng = np.random.default_rng(0)
  batch = setup.global_batch({
      "image": rng.integers(0, config.model.vocab_size, (batch_size, *setup.image_shape),
                            dtype=np.int32),
      "label": rng.integers(0, max(1, config.model.num_classes), (batch_size,), dtype=np.int32)})
  state, _ = step(state, batch)  # donated: keep the newest state

  def one_step():
    nonlocal state
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  net_ms, step_ms, step_over_net = _interleaved_ms(
      lambda: jax.block_until_ready(net(*net_args)), one_step, steps)
  state, bare_steps_per_s = _bare_rate(step, state, batch, steps)
  stats = jax.devices()[0].memory_stats() or {}
  peak = performance.peak_flops()
  achieved = flops / (step_ms / 1e3) if flops else None
  result = {
      "config": name, "batch_size": batch_size, "timed_steps": steps,
      "devices": jax.device_count(),
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "net_compile_s": round(net_compile_s, 1), "step_compile_s": round(step_compile_s, 1),
      "compile_ratio": round(step_compile_s / net_compile_s, 2),
      "net_step_ms": round(net_ms, 1), "step_ms": round(step_ms, 1),
      "step_over_net": round(step_over_net, 3),
      "img_per_s": round(batch_size / (step_ms / 1e3), 2),
      "gflop_per_step": round(flops / 1e9, 1) if flops else None,
      "tflops_per_device": round(achieved / 1e12, 4) if achieved else None,
      "mfu": round(achieved / peak, 4) if (achieved and peak) else "n/a",
      "bare_steps_per_s": round(bare_steps_per_s, 2),
      "device_peak_gb": round(stats["peak_bytes_in_use"] / 2**30, 2)
      if "peak_bytes_in_use" in stats else None,
  }
  if loop:  # the bare rate again right after the loop: the ratio uses the mean of both
    result.update(_loop_rate(config, steps))
    _, bare_after = _bare_rate(step, state, batch, steps)
    result["bare_steps_per_s_after_loop"] = round(bare_after, 2)
    bare_mean = (bare_steps_per_s + bare_after) / 2
    result["loop_over_bare"] = round(result["loop_steps_per_s"] / bare_mean, 3)
  result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
  return result


def _loop_rate(config, steps):
  """Median train/steps_per_sec of the real loop (train_and_evaluate), warm intervals only."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  t = config.training
  with tempfile.TemporaryDirectory() as workdir:
    if config.data.dataset != "digits":  # random images of the config's shape
      rng = np.random.default_rng(0)
      shape = (max(256, 4 * t.batch_size), *config.model.image_shape)
      np.savez(os.path.join(workdir, "data.npz"),
               image=rng.integers(0, config.model.vocab_size, shape, dtype=np.int32))
      config.data.dataset, config.data.path = "npz", os.path.join(workdir, "data.npz")
    t.log_every = max(steps, 10)
    t.num_steps = 6 * t.log_every
    t.eval_every, t.checkpoint_every = 0, t.num_steps
    config.eval.num_examples, config.eval.num_time_samples = t.batch_size, 1
    config.sample.num_images, config.sample.num_steps = 1, 2
    rates = []
    train.train_and_evaluate(config, os.path.join(workdir, "run"), on_metrics=lambda step, m: (
        rates.append(m["train/steps_per_sec"]) if "train/steps_per_sec" in m else None))
  warm = rates[1:-1]  # the first interval holds the data warm-up, the last the save
  return {"loop_steps_per_s": round(_median(warm), 2), "loop_intervals": len(warm)}


COLUMNS = ("config", "devices", "batch_size", "net_compile_s", "step_compile_s", "compile_ratio",
           "net_step_ms", "step_ms", "step_over_net", "img_per_s", "gflop_per_step",
           "tflops_per_device", "mfu", "peak_rss_gb", "device_peak_gb", "loop_over_bare")


def _print_table(rows):
  print(" | ".join(COLUMNS))
  for row in rows:
    print(" | ".join(str(row.get(column, "")) for column in COLUMNS))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # the subprocess's config
  parser.add_argument("--out", default=str(RESULTS), help="JSON-lines file ('' = none)")
  parser.add_argument("--cpu_devices", default="",
                      help="comma-separated config.cpu_devices values to measure each config "
                      "at, in turn (default: each config's own)")
  args = parser.parse_args()
  if args.one:
    batch_size, steps, loop = PLAN[args.one]
    count = int(args.cpu_devices) if args.cpu_devices else None
    print("RESULT " + json.dumps(measure(args.one, batch_size, steps, loop, count)), flush=True)
    return
  names = args.only.split(",") if args.only else list(PLAN)
  unknown = sorted(set(names) - set(PLAN))
  if unknown:
    sys.exit(f"unknown config(s) {unknown}; known: {', '.join(PLAN)}")
  rows = []
  counts = args.cpu_devices.split(",") if args.cpu_devices else [""]
  for name, count in itertools.product(names, counts):
    print(f"measuring {name} (batch {PLAN[name][0]}, cpu_devices {count or 'of the config'}) "
          "...", flush=True)
    proc = subprocess.run([sys.executable, __file__, f"--one={name}", f"--cpu_devices={count}"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(proc.stderr[-2000:])
      sys.exit(f"{name} failed (exit {proc.returncode})")
    row = {**json.loads(lines[-1][len("RESULT "):]), **machine.describe()}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps({"benchmark": "train_throughput", **row}) + "\n")
  _print_table(rows)


if __name__ == "__main__":
  main()
