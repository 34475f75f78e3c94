"""FLOP counts of compiled steps and utilisation against the accelerator's peak.

MFU (model FLOP utilisation) = achieved FLOP/s per device / the device's peak. The
FLOPs are XLA's count for the compiled (per-device, partitioned) program,
`compiled.cost_analysis()["flops"]`. Peaks are dense bfloat16 tensor-core figures
from the vendors' data sheets; a float32 model cannot reach them, so read MFU as
utilisation of the chip's best case.
"""
from typing import Any, Optional

import jax

# device_kind substring -> peak dense bf16 FLOP/s per device (chip).
PEAK_FLOPS_PER_DEVICE: dict[str, float] = {
    "H200": 989e12,       # NVIDIA H200 SXM
    "H100": 989e12,       # NVIDIA H100 SXM
    "A100": 312e12,       # NVIDIA A100
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # TPU v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,     # device_kind of v5p
}


def peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """Peak FLOP/s of `device` (default: the first device), or None where unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS_PER_DEVICE.items():
    if name.lower() in kind.lower():
      return peak
  return None


def flops_of(compiled: Any) -> Optional[float]:
  """FLOPs of one call of a compiled (per-device) program, or None if XLA gives no count.

  compiled: a jax.stages.Compiled (jax.jit(f).lower(...).compile()); reads
  compiled.cost_analysis()["flops"].
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def utilisation(steps_per_sec: float, flops_per_step: Optional[float]) -> dict[str, float]:
  """{"train/tflops_per_device": ..., "train/mfu": ...} where they are known.

  tflops_per_device = steps_per_sec * flops_per_step / 1e12 (TFLOP/s per device);
  mfu = achieved FLOP/s / peak_flops() (a fraction; absent where the peak is unknown).
  """
  if flops_per_step is None:
    return {}
  achieved = steps_per_sec * flops_per_step
  scalars = {"train/tflops_per_device": achieved / 1e12}
  peak = peak_flops()
  if peak is not None:
    scalars["train/mfu"] = achieved / peak
  return scalars
