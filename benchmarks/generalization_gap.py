r"""Where a trained model overfits: its bound on training and on test images, per range of t.

For a trained run (its newest checkpoint's EMA parameters) the diffusion term of the VDM
bound is split over B equal bins of t in [0, 1]:

  L_diffusion = int_0^1 L(t) dt = sum_b int_{bin b} L(t) dt,
  L(t) = 0.5 gamma'(t) ||eps - eps_hat(z_t, gamma(t))||^2  (nats per image),

and each bin's integral is estimated, on the training and on the test split, as the bin
width times the mean of L(t) over R draws per image of t ~ U(bin) and eps ~ N(0, I). Each
bin is reported in bits/dim with its standard error over images, the test - training gap,
and gamma at the bin's edges. The bins' sums are the diffusion terms of the two splits
(prior and reconstruction terms are left out: they are about 0.003 bits/dim each on digits).
Printed as a table, and appended as one JSON line to
benchmarks/results/generalization_gap.jsonl.

  python benchmarks/generalization_gap.py --config=configs/digits.py --workdir=/tmp/vdm_digits
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import machine  # benchmarks/machine.py: a script's own folder is on sys.path
import runs  # benchmarks/runs.py: it also puts the repository on sys.path

from vdm_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = runs.ROOT / "benchmarks" / "results" / "generalization_gap.jsonl"


def _diffusion_integrand(eps_fn, gamma_fn, vocab_size):
  """jit (x [N, ...], t [N], key) -> L(t) [N] in nats: the one-sample diffusion term at t."""
  def integrand(x, t, key):
    _, eps, eps0 = losses.draw_noise(key, x.shape, antithetic=False)
    _, terms = losses.vdm_loss_from_noise(eps_fn, gamma_fn, x, t, eps, eps0,
                                          vocab_size=vocab_size)
    return terms["diffusion"]
  return jax.jit(integrand)


def bin_terms(integrand, images, edges, repeats, key, to_bpd):
  """Per bin: (integral of L over the bin in bits/dim, its standard error over images)."""
  n, results = images.shape[0], []
  for b, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
    draws = []
    for r in range(repeats):
      k_t, k_eps = jax.random.split(jax.random.fold_in(key, b * repeats + r))
      t = jax.random.uniform(k_t, (n,), minval=low, maxval=high)
      draws.append(np.asarray(integrand(images, t, k_eps), np.float64))
    per_image = np.mean(draws, axis=0) * (high - low) * to_bpd
    results.append((float(per_image.mean()), float(per_image.std(ddof=1) / np.sqrt(n))))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--workdir", required=True, help="a trained run of --config")
  parser.add_argument("--num_bins", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  config, setup, step, state = runs.restore(args.config, args.workdir)
  eps_fn, gamma_fn = setup.model.eps_fn(state.ema_params), setup.model.gamma_fn(state.ema_params)
  integrand = _diffusion_integrand(eps_fn, gamma_fn, config.model.vocab_size)
  edges = np.linspace(0.0, 1.0, args.num_bins + 1)
  splits = runs.split_images(config)
  to_bpd = 1.0 / (np.prod(splits["test"].shape[1:]) * np.log(2.0))
  terms = {name: bin_terms(integrand, images, edges, args.repeats, jax.random.PRNGKey(i), to_bpd)
           for i, (name, images) in enumerate(splits.items())}
  gammas = np.asarray(gamma_fn(jnp.asarray(edges, jnp.float32)), np.float64)
  print(f"checkpoint {step}: diffusion term per bin of t, bits/dim (+- standard error)")
  print("   t range     gamma range      train             test              test - train")
  for b in range(args.num_bins):
    (tr, tr_se), (te, te_se) = terms["train"][b], terms["test"][b]
    print(f"  [{edges[b]:.2f}, {edges[b + 1]:.2f})  [{gammas[b]:6.2f}, {gammas[b + 1]:6.2f})  "
          f"{tr:.4f} +- {tr_se:.4f}  {te:.4f} +- {te_se:.4f}  {te - tr:+.4f}")
  totals = {name: sum(m for m, _ in values) for name, values in terms.items()}
  print(f"  sum: train {totals['train']:.4f}, test {totals['test']:.4f}, "
        f"gap {totals['test'] - totals['train']:+.4f}")
  row = {"benchmark": "generalization_gap", "config": args.config, "checkpoint_step": step,
         "num_bins": args.num_bins, "repeats": args.repeats, "t_edges": edges.tolist(),
         "gamma_edges": gammas.tolist(), "diffusion_bpd": terms, "totals": totals,
         **machine.describe()}
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
