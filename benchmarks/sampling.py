r"""Sampler speed on a small ScoreUNet and sampler quality on a 2-D Gaussian mixture.

  python benchmarks/sampling.py                 # CPU defaults, a few minutes
  python benchmarks/sampling.py --batch 64 --ratio_steps 1000

Speed: seconds per batch for each sampler and step count with the fixture-sized
ScoreUNet (n_embd 32, n_layer 2, attention, 8x8x3; random parameters), and the
overhead ratio  time(ancestral, N steps) / (N * time(one jitted forward)), goal <= 1.05.
Quality: energy distance and sliced Wasserstein-1 between 4000 sampler outputs and
4000 exact samples of z_0 for a 2-D mixture with the closed-form optimal eps_hat
(vdm_jax/testing/gaussian_mixture.py). Results are printed and appended as JSON lines to
benchmarks/results/sampling.jsonl.
"""
import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture
from vdm_jax.nets import score_unet

import machine  # benchmarks/machine.py: a script's own folder is on sys.path

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "sampling.jsonl"


def _sampler_fns():
  """name -> (eps_fn, gamma_fn, key, shape, num_steps) -> z_0."""
  return {
      "ancestral": lambda e, g, k, s, n: sampling.ancestral_sample(e, g, k, s, num_steps=n),
      "ddim": lambda e, g, k, s, n: sampling.ddim_sample(e, g, k, s, num_steps=n),
      "dpm_solver_2m": lambda e, g, k, s, n: sampling.ode_sample(e, g, k, s, num_steps=n),
      "heun": lambda e, g, k, s, n: sampling.ode_sample(e, g, k, s, num_steps=n, solver="heun"),
      "pc": lambda e, g, k, s, n: sampling.pc_sample(e, g, k, s, num_steps=n),
  }


def _time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def speed(batch, ratio_steps, step_counts):
  """Seconds per batch of samples, and the ancestral-loop overhead ratio."""
  net = score_unet.ScoreUNet(n_embd=32, n_layer=2, with_attention=True, dropout=0.0)
  shape = (batch, 8, 8, 3)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros((batch,)))
  gamma_fn = schedules.fixed_linear()
  forward = jax.jit(lambda p, z, g: net.apply(p, z, g))
  z, g = jax.random.normal(jax.random.PRNGKey(1), shape), jnp.full((batch,), -3.0)
  t_forward = _time(forward, params, z, g, repeats=20)
  rows = []
  for name, fn in _sampler_fns().items():
    for n in step_counts.get(name, ()):
      run = jax.jit(lambda p, k, fn=fn, n=n: fn(lambda z, g: net.apply(p, z, g), gamma_fn, k, shape, n))
      seconds = _time(run, params, jax.random.PRNGKey(2), repeats=1 if n >= 500 else 3)
      rows.append({"sampler": name, "steps": n, "seconds_per_batch": seconds})
      print(f"  {name:14s} {n:5d} steps: {seconds:8.3f} s / batch of {batch}")
  run = jax.jit(lambda p, k: sampling.ancestral_sample(lambda z, g: net.apply(p, z, g), gamma_fn, k, shape,
                                                       num_steps=ratio_steps))
  t_loop = _time(run, params, jax.random.PRNGKey(3), repeats=2)
  # Floor: the same number of forwards chained in a bare fori_loop (no schedule, RNG or update).
  bare = jax.jit(lambda p, z: jax.lax.fori_loop(0, ratio_steps, lambda i, z: net.apply(p, z, g), z))
  t_bare = _time(bare, params, z, repeats=2)
  ratio, bare_ratio = t_loop / (ratio_steps * t_forward), t_loop / t_bare
  print(f"  forward {1e3 * t_forward:.3f} ms; ancestral {ratio_steps} steps {t_loop:.3f} s; "
        f"ratio to {ratio_steps} x forward {ratio:.3f}; to a bare loop of forwards {bare_ratio:.3f}")
  return {"model": "ScoreUNet n_embd=32 n_layer=2 attention 8x8x3", "batch": batch, "forward_ms": 1e3 * t_forward,
          "ratio_steps": ratio_steps, "ancestral_seconds": t_loop, "overhead_ratio": ratio,
          "bare_loop_seconds": t_bare, "ratio_to_bare_loop": bare_ratio, "rows": rows}


def quality(num, step_counts):
  """Energy distance and sliced W1 to exact z_0 samples of a 2-D mixture, per sampler and steps."""
  means, stds, weights = np.array([[-1.0, 0.5], [1.0, -0.5]]), np.array([0.3, 0.2]), np.array([0.3, 0.7])
  eps_fn, gamma_fn = gaussian_mixture.mixture_eps_fn(means, stds, weights), schedules.fixed_linear()
  exact = gaussian_mixture.sample_mixture(jax.random.PRNGKey(10), num, means, stds, weights, gamma_0=gamma_fn(0.0))
  exact_b = gaussian_mixture.sample_mixture(jax.random.PRNGKey(11), num, means, stds, weights, gamma_0=gamma_fn(0.0))
  rows = [{"sampler": "exact (second draw)", "steps": 0, "energy": gaussian_mixture.energy_distance(exact, exact_b),
           "sliced_w1": gaussian_mixture.sliced_wasserstein(exact, exact_b)}]
  for name, fn in _sampler_fns().items():
    for n in step_counts:
      z = jax.jit(lambda k, fn=fn, n=n: fn(eps_fn, gamma_fn, k, (num, 2), n))(jax.random.PRNGKey(12))
      rows.append({"sampler": name, "steps": n, "energy": gaussian_mixture.energy_distance(z, exact),
                   "sliced_w1": gaussian_mixture.sliced_wasserstein(z, exact)})
  print(f"  {'sampler':20s} {'steps':>5s} {'energy':>9s} {'sliced W1':>9s}")
  for row in rows:
    print(f"  {row['sampler']:20s} {row['steps']:5d} {row['energy']:9.5f} {row['sliced_w1']:9.5f}")
  return {"toy": "2-D mixture w=(0.3,0.7) mu=(-1,0.5),(1,-0.5) s=(0.3,0.2), fixed_linear(-13.3,5)",
          "num_samples": num, "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--ratio_steps", type=int, default=1000)
  parser.add_argument("--num_toy", type=int, default=4000)
  parser.add_argument("--skip_speed", action="store_true")
  parser.add_argument("--skip_quality", action="store_true")
  args = parser.parse_args()
  record = {"benchmark": "sampling", **machine.describe()}
  print(json.dumps(record))
  if not args.skip_speed:
    print("speed (ScoreUNet):")
    record["speed"] = speed(args.batch, args.ratio_steps, {
        "ancestral": (50, 1000), "ddim": (25, 50), "dpm_solver_2m": (10, 25), "heun": (10, 25), "pc": (50,)})
  if not args.skip_quality:
    print("quality (2-D mixture, closed-form eps):")
    record["quality"] = quality(args.num_toy, (10, 25, 50, 100, 1000))
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  with open(RESULTS, "a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"appended to {RESULTS}")


if __name__ == "__main__":
  main()
