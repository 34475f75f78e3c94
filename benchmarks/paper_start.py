r"""Time to a trained-and-evaluated paper config, as a user would start it.

Runs `python main.py --config=configs/cifar10.py` (the VDM paper's CIFAR-10 model) on
random .npz data: batch 8, 2 training steps, an evaluation of 8 images and 1 sample in 2
steps, and reports the wall time and the peak resident memory of the main.py process
(ru_maxrss of the child). Appends a JSON line to benchmarks/results/paper_start.jsonl.

  python benchmarks/paper_start.py
  python benchmarks/paper_start.py --config=configs/imagenet32.py
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import machine  # benchmarks/machine.py: a script's own folder is on sys.path
import runs  # benchmarks/runs.py

ROOT = runs.ROOT
OVERRIDES = ("--config.training.batch_size=8", "--config.training.num_steps=2",
             "--config.training.log_every=1", "--config.training.checkpoint_every=2",
             "--config.eval.batch_size=8", "--config.eval.num_examples=8",
             "--config.sample.num_images=1", "--config.sample.num_steps=2")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_start.jsonl"))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    image_shape = runs.load_config(args.config).model.image_shape
    data = os.path.join(tmp, "random.npz")
    rng = np.random.default_rng(0)
    np.savez(data, image=rng.integers(0, 256, (80, *image_shape), dtype=np.uint8))
    command = [sys.executable, "main.py", f"--config={args.config}", f"--workdir={tmp}/run",
               "--config.data.dataset=npz", f"--config.data.path={data}", *OVERRIDES]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(proc.stderr[-3000:])
  peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  result = {"benchmark": "paper_start", "config": args.config, "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak_gb, 2), "command": " ".join(command[1:]),
            **machine.describe()}
  print(json.dumps(result))
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
