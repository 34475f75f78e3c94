"""What a benchmark row records about where it ran: one description for every script.

  row = {**figures, **machine.describe()}

The CPU model (from /proc/cpuinfo where there is one), core count, host name, 1-minute
load average (these machines are shared: a loaded row is not comparable), JAX's backend
and device, library versions and the UTC time. speed_probe_s times a fixed workload, for
rows whose figures depend on how fast the shared cores run at the moment.
"""
import datetime
import os
import platform
import time


def cpu_model() -> str:
  """The CPU's model name ("Intel(R) Xeon(R) ...", "AMD EPYC ..."), else platform's guess."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def describe() -> dict:
  """{"cpu", "cpu_count", "host", "load_avg_1m", "backend", "device", "num_devices",
  "python", "jax_version", "date"} of this process's machine (imports jax)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "host": platform.node(),
          "load_avg_1m": round(os.getloadavg()[0], 2), "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
          "python": platform.python_version(), "jax_version": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def speed_probe_s(num_additions: int = 10_000_000) -> float:
  """CPU seconds (this process, one thread) of a fixed pure-Python loop of additions.

  Recorded beside timings that depend on how fast the shared cores run: on this project's
  2-core machines the same test suite used about twice the CPU seconds in some hours as in
  others, and the CIFAR-10 network step up to five times the project's idle figure. The
  probe read 0.58 to 0.72 s in slow hours; with no fast-hour reading yet, it is not shown
  to tell the two states apart.
  """
  start = time.process_time()
  total = 0
  for i in range(num_additions):
    total += i
  assert total == num_additions * (num_additions - 1) // 2
  return round(time.process_time() - start, 3)
