r"""Importance-sampled diffusion times on a trained model: same bound, how much less variance.

For a trained run (its newest checkpoint's EMA parameters), the one-sample VDM bound of
each test image is drawn R times with times t ~ U(0, 1) and R times with t ~ q, the
histogram proposal of vdm_jax.time_sampling (q proportional to sqrt(E[L(t)^2]) per bin,
with a 5 % uniform share). q is estimated beforehand from pilot passes over the TRAINING
images, so it does not depend on the test draws and the weighted estimate stays unbiased.
Both estimators use the same random numbers (u, eps, eps0; t = quantile(q, u)), so their
difference is measured pairwise.

Reported, in bits/dim:
  * the bound's mean under each proposal, with the standard error over test images;
  * the paired difference of the two means and its standard error (it must be within
    3 of them: both estimate the same bound);
  * the variance of the one-sample estimate given the image, averaged over test images
    (what K samples per image divide by K), and the ratio uniform / importance-sampled.
Printed, and appended as one JSON line to benchmarks/results/importance_time.jsonl.

  python benchmarks/importance_time.py --config=configs/digits.py --workdir=/tmp/vdm_digits
"""
import argparse
import json
import time

import jax
import numpy as np

import machine  # benchmarks/machine.py: a script's own folder is on sys.path
import runs  # benchmarks/runs.py: it also puts the repository on sys.path

from vdm_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import time_sampling  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = runs.ROOT / "benchmarks" / "results" / "importance_time.jsonl"


def _one_sample_bounds(eps_fn, gamma_fn, vocab_size):
  """jit (x, key, proposal) -> (bound [B] nats, t [B], unweighted diffusion [B]) for t ~ q."""
  def bounds(x, key, proposal):
    u, eps, eps0 = losses.draw_noise(key, x.shape, antithetic=False)
    t = time_sampling.quantile(proposal, u)
    loss, terms = time_sampling.vdm_loss_from_noise(eps_fn, gamma_fn, x, t, eps, eps0, proposal,
                                                    vocab_size=vocab_size)
    return loss, t, terms["diffusion"] / time_sampling.importance_weights(proposal, t)
  return jax.jit(bounds)


def pilot_proposal(bounds, train_images, key, *, num_bins, passes, uniform_weight):
  """q from `passes` uniform-time passes over the training images (per-bin E[L(t)^2])."""
  moments = time_sampling.init_second_moments(num_bins)
  uniform = time_sampling.uniform_proposal(num_bins)
  for p in range(passes):
    _, t, diffusion = bounds(train_images, jax.random.fold_in(key, p), uniform)
    moments = time_sampling.update_second_moments(moments, t, diffusion)
  estimates = time_sampling.second_moment_estimates(moments)
  return time_sampling.proposal_from_second_moments(estimates, uniform_weight=uniform_weight)


def compare(bounds, test_images, key, proposal, *, repeats, to_bpd):
  """R paired draws per test image: the figures of the module docstring (bits/dim)."""
  uniform = time_sampling.uniform_proposal(proposal.probs.shape[0])
  draws = {"uniform": [], "importance": []}
  for r in range(repeats):  # the same key for both: common random numbers
    draws["uniform"].append(bounds(test_images, jax.random.fold_in(key, r), uniform)[0])
    draws["importance"].append(bounds(test_images, jax.random.fold_in(key, r), proposal)[0])
  draws = {k: np.asarray(v, np.float64) * to_bpd for k, v in draws.items()}  # [R, N]
  n = test_images.shape[0]
  result = {}
  for name, values in draws.items():
    per_image = values.mean(axis=0)
    result[name] = {"bpd": float(per_image.mean()),
                    "bpd_stderr": float(per_image.std(ddof=1) / np.sqrt(n)),
                    "one_sample_variance": float(values.var(axis=0, ddof=1).mean())}
  difference = (draws["uniform"] - draws["importance"]).mean(axis=0)
  result["difference_bpd"] = float(difference.mean())
  result["difference_stderr"] = float(difference.std(ddof=1) / np.sqrt(n))
  result["variance_ratio"] = (result["uniform"]["one_sample_variance"]
                              / result["importance"]["one_sample_variance"])
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--workdir", required=True, help="a trained run of --config")
  parser.add_argument("--num_bins", type=int, default=32)
  parser.add_argument("--pilot_passes", type=int, default=8)
  parser.add_argument("--uniform_weight", type=float, default=0.05)
  parser.add_argument("--repeats", type=int, default=64)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  config, setup, step, state = runs.restore(args.config, args.workdir)
  params = state.ema_params
  m = setup.model
  bounds = _one_sample_bounds(m.eps_fn(params), m.gamma_fn(params), config.model.vocab_size)
  images = runs.split_images(config)
  train_images, test_images = images["train"], images["test"]
  start = time.perf_counter()
  proposal = pilot_proposal(bounds, train_images, jax.random.PRNGKey(1), num_bins=args.num_bins,
                            passes=args.pilot_passes, uniform_weight=args.uniform_weight)
  to_bpd = 1.0 / (np.prod(test_images.shape[1:]) * np.log(2.0))
  result = compare(bounds, test_images, jax.random.PRNGKey(2), proposal, repeats=args.repeats,
                   to_bpd=to_bpd)
  row = {"benchmark": "importance_time", "config": args.config, "checkpoint_step": step,
         "num_test_images": int(test_images.shape[0]), "num_train_images": int(train_images.shape[0]),
         **{k: getattr(args, k) for k in ("num_bins", "pilot_passes", "uniform_weight", "repeats")},
         "proposal_probs": [round(float(p), 5) for p in proposal.probs], **result,
         "seconds": round(time.perf_counter() - start, 1), **machine.describe()}
  for name in ("uniform", "importance"):
    r = result[name]
    print(f"{name:>10}: {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} bits/dim, one-sample variance "
          f"{r['one_sample_variance']:.4g} (bits/dim)^2")
  print(f"difference {result['difference_bpd']:.2e} +- {result['difference_stderr']:.1e}; "
        f"variance ratio uniform / importance {result['variance_ratio']:.2f}")
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
