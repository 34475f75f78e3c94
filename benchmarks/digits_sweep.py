r"""The digits recipe sweep: test bits/dim of configs/digits.py variants at a step budget.

Each run trains configs/digits.py with the given overrides in a fresh subprocess
(train_and_evaluate, evaluation only at the end: K = eval.num_time_samples time samples
per test digit, EMA parameters) and records the test bits/dim with its standard error and
its three terms (prior, reconstruction, diffusion), the training wall time and steps/s,
and the seed. Runs append JSON lines to benchmarks/results/digits_sweep.jsonl; --table
prints a markdown table of every setting found there: the mean +- sd over its seeds, or,
for a setting run with one seed, that run's evaluation standard error.

  python benchmarks/digits_sweep.py --name=base --seeds=0,1,2
  python benchmarks/digits_sweep.py --name=wide --seeds=0 model.n_embd=96 training.batch_size=64
  python benchmarks/digits_sweep.py --table
"""
import argparse
import ast
import collections
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "digits_sweep.jsonl"


def _apply(config, overrides):
  """Sets section.field=value pairs (values parsed as Python literals where they parse)."""
  for item in overrides:
    field, raw = item.split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = config
    *parents, leaf = field.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value


def run_one(overrides, seed):
  """Trains one setting (inside its own subprocess); returns its figures."""
  sys.path.insert(0, str(ROOT))
  from configs import digits  # pylint: disable=g-import-not-at-top
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  _apply(config, overrides)
  config.seed = seed
  config.training.eval_every = 0
  config.training.checkpoint_every = config.training.num_steps
  train.use_cpu_devices(config.cpu_devices)  # as main.py does
  rates = []
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, workdir, on_metrics=lambda step, m: (
        rates.append(m["train/steps_per_sec"]) if "train/steps_per_sec" in m else None))
    wall = time.perf_counter() - start
  terms = {f"bpd_{term}": round(metrics[f"bpd_{term}"], 5)
           for term in ("prior", "reconstruction", "diffusion")}
  return {"bpd": round(metrics["bpd"], 4), "bpd_stderr": round(metrics["bpd_stderr"], 4), **terms,
          "wall_s": round(wall, 1),
          "steps_per_s": round(sorted(rates)[len(rates) // 2], 2) if rates else None,
          "num_steps": config.training.num_steps, "batch_size": config.training.batch_size}


def _table():
  rows = collections.defaultdict(list)
  for line in RESULTS.read_text().splitlines():
    record = json.loads(line)
    rows[record["name"]].append(record)
  print("| setting | overrides | seeds | test bits/dim | steps | batch | steps/s | "
        "wall s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, records in rows.items():
    bpd = [r["bpd"] for r in records]
    mean = sum(bpd) / len(bpd)
    if len(bpd) > 1:
      spread = f"+- {(sum((b - mean) ** 2 for b in bpd) / (len(bpd) - 1)) ** 0.5:.4f}"
    else:
      spread = f"+- {records[0]['bpd_stderr']:.4f} (one seed: the evaluation's standard error)"
    rates = [r["steps_per_s"] for r in records if r["steps_per_s"]]
    base = f"(configs/digits.py as of {records[0]['date'][:10]})"  # the config changes
    print(f"| {name} | {' '.join(records[0]['overrides']) or base} | "
          f"{len(bpd)} | {mean:.4f} {spread} | {records[0]['num_steps']} | "
          f"{records[0]['batch_size']} | {max(rates) if rates else '-'} | "
          f"{min(r['wall_s'] for r in records)} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("overrides", nargs="*", help="section.field=value")
  parser.add_argument("--name", default="")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--table", action="store_true")
  parser.add_argument("--child_seed", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.table:
    _table()
    return
  if args.child_seed is not None:
    print("RESULT " + json.dumps(run_one(args.overrides, args.child_seed)), flush=True)
    return
  for seed in (int(s) for s in args.seeds.split(",")):
    proc = subprocess.run([sys.executable, __file__, f"--child_seed={seed}", *args.overrides],
                          capture_output=True, text=True, cwd=ROOT, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      sys.exit(proc.stderr[-3000:])
    record = {"name": args.name or " ".join(args.overrides) or "base", "seed": seed,
              "overrides": args.overrides, **json.loads(lines[-1][len("RESULT "):]),
              "load_avg_1m": round(os.getloadavg()[0], 2),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(record), flush=True)
    with open(RESULTS, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
