"""Files the trainer writes for people: sample grids (PNG), GIFs, the gamma(t) plot, and
the learning curve with the evaluation history it is drawn from (eval_history.jsonl)."""
import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt


def to_uint8(x: npt.ArrayLike, vocab_size: int) -> np.ndarray:
  """Integer images in [0, V) -> uint8 in [0, 255]: round(x * 255 / (V - 1))."""
  x = np.asarray(x, np.float64)
  return np.clip(np.round(x * 255.0 / (vocab_size - 1)), 0, 255).astype(np.uint8)


def image_grid(images: npt.ArrayLike, *, pad: int = 1) -> np.ndarray:
  """Tiles uint8 [N,H,W,C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def _pil(grid, scale):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  return image


def _scale_for(grid, min_side=256):
  return max(1, -(-min_side // max(grid.shape[:2])))


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] grid as PNG, upscaled (nearest) to >= 256 px."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  _pil(grid, _scale_for(grid)).save(path)


def save_gif(path: str, grids: Sequence[np.ndarray], *, duration_ms: int = 100) -> None:
  """Writes uint8 [H, W, C] frames as a looping animated GIF (last frame held longer)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  scale = _scale_for(grids[0])
  frames = [_pil(g, scale).convert("P") for g in grids]
  durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 10]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_gamma_plot(path: str, t: npt.ArrayLike, gamma: npt.ArrayLike, *,
                    title: str = "learned gamma(t)") -> None:
  """Plots gamma(t) = -log SNR(t) against t ([N] each) and writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
  ax.plot(np.asarray(t), np.asarray(gamma))
  ax.set_xlabel("t")
  ax.set_ylabel("gamma(t) = -log SNR")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


EVAL_HISTORY = "eval_history.jsonl"


def read_eval_history(workdir: str) -> list[dict]:
  """The evaluations recorded in workdir/eval_history.jsonl, in step order ([] if none)."""
  path = os.path.join(workdir, EVAL_HISTORY)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def record_evaluation(workdir: str, record: dict) -> list[dict]:
  """Adds {"step", "elapsed_s", "bpd", "bpd_stderr", ...} to the history and returns it.

  Records of this step or later (an evaluation redone after a resume) are replaced; the
  file is rewritten atomically.
  """
  history = [r for r in read_eval_history(workdir) if r["step"] < record["step"]] + [record]
  path = os.path.join(workdir, EVAL_HISTORY)
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in history)
  os.replace(path + ".tmp", path)
  return history


def save_learning_curve(path: str, history: list[dict], *,
                        baseline: Optional[float] = None) -> None:
  """Test bits/dim (+- its standard error) against wall-clock seconds and against steps.

  history: records of `record_evaluation`; baseline: the per-pixel categorical bits/dim,
  drawn as a dashed line. Writes a PNG.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  bpd = np.asarray([r["bpd"] for r in history])
  stderr = np.asarray([r.get("bpd_stderr", 0.0) for r in history])
  fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100, sharey=True)
  for ax, key, label in ((axes[0], "elapsed_s", "wall-clock seconds"), (axes[1], "step", "steps")):
    x = np.asarray([r[key] for r in history], np.float64)
    ax.errorbar(x, bpd, yerr=stderr, marker="o", capsize=2, label="test (EMA params)")
    if baseline is not None:
      ax.axhline(baseline, color="k", ls="--", label="per-pixel categorical baseline")
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("test bits/dim")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
