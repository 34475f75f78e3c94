"""Tests of vdm_jax.likelihood.evaluate_bpd: exact counting, invariances, 1 vs 8 devices."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import likelihood
from vdm_jax import losses

# Shared with the 8-device subprocess: a fixed closed-form model and a dataset of 13 images.
SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from vdm_jax import likelihood, schedules

    def eps_fn(z, gamma):  # the optimal eps_hat for x ~ N(0, 0.5^2) per dimension
      gamma = gamma.reshape((-1,) + (1,) * (z.ndim - 1))
      alpha2, sigma2 = jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)
      return jnp.sqrt(sigma2) * z / (alpha2 * 0.25 + sigma2)

    IMAGES = np.random.default_rng(7).integers(0, 256, (13, 4, 4, 3)).astype(np.uint8)
    LOSS_FN = likelihood.loss_fn_from_eps(eps_fn, schedules.fixed_linear())

    def run(batch_size, num_time_samples=3):
      batches = [{"image": IMAGES[i:i + batch_size]} for i in range(0, len(IMAGES), batch_size)]
      return likelihood.evaluate_bpd(LOSS_FN, batches, jax.random.PRNGKey(11), num_time_samples=num_time_samples)
""")
namespace = {}
exec(SETUP, namespace)  # pylint: disable=exec-used


def test_every_example_is_counted_once_and_the_mean_is_over_examples():
  result = namespace["run"](5)  # batches of 5, 5, 3
  assert result["num_examples"] == 13
  # Recompute each example's K = 3 loss samples directly with its key fold_in(key, n).
  direct = {"bpd": [], "prior": [], "reconstruction": [], "diffusion": []}
  for n, image in enumerate(namespace["IMAGES"]):
    loss, terms = namespace["LOSS_FN"](None, {"image": jnp.broadcast_to(image, (3,) + image.shape)},
                                       jax.random.fold_in(jax.random.PRNGKey(11), n))
    for name, value in {"bpd": loss, **terms}.items():
      direct[name].append(float(jnp.mean(value)))
  # Each term averaged on its own, like the total. float32: a term is a sum of 48 per-dim
  # values whose rounding (vmapped here, batched there) is ~1e-6 of the total bits/dim.
  for name, values in direct.items():
    np.testing.assert_allclose(result[name], np.mean(values) / (4 * 4 * 3 * math.log(2)),
                               rtol=1e-5, atol=1e-6 * result["bpd"], err_msg=name)
  assert 0 < result["bpd_stderr"] < result["bpd"]


def _first_pixel_examples(seed, num, low, high):
  """(values [num] integers in [low, high), images [num, 2, 2, 1] with those first pixels)."""
  values = np.random.default_rng(seed).integers(low, high, num)
  images = np.zeros((num, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = values
  return values, images


def _first_pixel(batch):
  """A "loss" of known value: each example's first pixel, float32 [B]."""
  return batch["image"][:, 0, 0, 0].astype(jnp.float32)


def test_bpd_stderr_is_the_sample_std_over_sqrt_n_for_losses_of_known_spread():
  """A "loss" equal to each example's first pixel: the per-example values are known, so the
  standard error of the mean is std(values, ddof=1) / sqrt(N), in bits/dim."""
  values, images = _first_pixel_examples(1608, 13, 0, 200)

  def loss_fn(params, batch, key):
    del params, key
    loss = _first_pixel(batch)
    return loss, {"value": loss}

  batches = [{"image": images[i:i + 5]} for i in range(0, 13, 5)]  # 5, 5, 3: padding masked
  result = likelihood.evaluate_bpd(loss_fn, batches, jax.random.PRNGKey(0), num_time_samples=2)
  to_bpd = 1.0 / (4 * math.log(2))
  np.testing.assert_allclose(result["bpd"], values.mean() * to_bpd, rtol=1e-6)
  # float64 sums of float32 integers: exact up to the final divisions, 1e-6 relative.
  np.testing.assert_allclose(result["bpd_stderr"], values.std(ddof=1) / np.sqrt(13) * to_bpd,
                             rtol=1e-6)


def test_counts_are_reported_as_their_mean_per_example_and_stay_out_of_the_bound():
  """A loss with a term "steps" that is a count (like the ODE's nfe): its mean over the
  examples comes back as is, not in bits/dim, and the bound and the other terms ignore it."""
  values, images = _first_pixel_examples(1609, 7, 1, 50)

  def loss_fn(params, batch, key):
    del params, key
    loss = _first_pixel(batch)
    return loss, {"value": loss, "steps": 3.0 * loss}

  batches = [{"image": images[:4]}, {"image": images[4:]}]
  result = likelihood.evaluate_bpd(loss_fn, batches, jax.random.PRNGKey(0), counts=("steps",))
  to_bpd = 1.0 / (4 * math.log(2))
  np.testing.assert_allclose(result["steps"], 3.0 * values.mean(), rtol=1e-6)
  np.testing.assert_allclose(result["value"], values.mean() * to_bpd, rtol=1e-6)
  np.testing.assert_allclose(result["bpd"], values.mean() * to_bpd, rtol=1e-6)
  with pytest.raises(ValueError, match=r"counts \['nfe'\] are not terms of loss_fn.*'steps'"):
    likelihood.evaluate_bpd(loss_fn, batches, jax.random.PRNGKey(0), counts=("nfe",))


def test_bpd_does_not_depend_on_the_batch_size():
  a, b = namespace["run"](5), namespace["run"](13)
  np.testing.assert_allclose(a["bpd"], b["bpd"], rtol=1e-6)
  assert a["num_examples"] == b["num_examples"] == 13


def test_k_antithetic_time_samples_put_one_time_in_each_of_k_cells():
  num_cells = 4

  def loss_fn(params, batch, key):  # "loss" = index of the grid cell holding each t
    del params
    t = losses.sample_times(key, batch["image"].shape[0], antithetic=True)
    cell = jnp.floor(t * num_cells)
    return cell, {"cell": cell}

  images = np.zeros((7, 2, 2, 1), np.uint8)
  result = likelihood.evaluate_bpd(loss_fn, [{"image": images}], jax.random.PRNGKey(0), num_time_samples=num_cells)
  # Each example's mean cell index is exactly (0 + 1 + 2 + 3) / 4, so the spread is zero.
  np.testing.assert_allclose(result["nats"], (num_cells - 1) / 2, rtol=1e-6)
  assert result["bpd_stderr"] < 1e-6


def test_bpd_is_the_same_on_one_and_on_eight_devices():
  one = namespace["run"](5)
  code = SETUP + "\nimport json\nassert jax.device_count() == 8\nprint(json.dumps(run(5)))\n"
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  assert eight["num_examples"] == one["num_examples"] == 13
  for name in ("bpd", "prior", "reconstruction", "diffusion"):
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-5)


def test_bad_inputs_raise_value_error():
  loss_fn = namespace["LOSS_FN"]
  with pytest.raises(ValueError, match="num_time_samples"):
    likelihood.evaluate_bpd(loss_fn, [], jax.random.PRNGKey(0), num_time_samples=0)
  with pytest.raises(ValueError, match="no examples"):
    likelihood.evaluate_bpd(loss_fn, [], jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="image"):
    likelihood.evaluate_bpd(loss_fn, [{"x": np.zeros((2, 2, 2, 3))}], jax.random.PRNGKey(0))
