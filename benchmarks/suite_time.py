r"""Wall time of the README's test command (what CI runs), with the machine's speed beside it.

Runs `python -m pytest -q -n 2 tests` (JAX_PLATFORMS=cpu) from the repository root and
records the wall time, the CPU seconds of the pytest processes and their children (user
plus system), pytest's summary line, the git commit, and machine.speed_probe_s before and
after the run. The same suite's CPU seconds vary about two-fold between hours on this
project's shared 2-core machines; the probe is recorded to help tell those states apart
(its slow-hour readings, 0.58 to 0.72 s, have no fast-hour reading to compare with yet).
Appends a JSON line to benchmarks/results/suite_time.jsonl. Takes 5 to 10 minutes.

  python benchmarks/suite_time.py
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import machine  # benchmarks/machine.py: a script's own folder is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND = ("-m", "pytest", "-q", "-n", "2", "tests")


def _commit() -> str:
  """HEAD's hash, with "+changes" when the work tree differs from it."""
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
  return head + ("+changes" if dirty else "")


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suite_time.jsonl"))
  args = parser.parse_args()
  probe_before = machine.speed_probe_s()
  print(f"speed probe {probe_before} s; running {' '.join(COMMAND[1:])} (5 to 10 minutes)",
        flush=True)
  cpu_before, start = _children_cpu_s(), time.perf_counter()
  proc = subprocess.run([sys.executable, *COMMAND], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_before
  lines = proc.stdout.strip().splitlines()
  result = {"benchmark": "suite_time", "commit": _commit(), "returncode": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr[-300:], "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "speed_probe_before_s": probe_before,
            "speed_probe_after_s": machine.speed_probe_s(),
            "command": "python " + " ".join(COMMAND), **machine.describe()}
  print(json.dumps(result))
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")
  if proc.returncode:
    sys.exit(proc.stdout[-3000:])


if __name__ == "__main__":
  main()
