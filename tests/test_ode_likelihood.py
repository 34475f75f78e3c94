"""likelihood.ode_nll / ode_loss_fn: exact likelihood through the probability-flow ODE.

With the optimal (MMSE) eps_hat of Gaussian or Gaussian-mixture data the probability-flow
ODE carries the true marginal q_0(z_0) to q_1(z_1), so
  -log p_ODE(z_0) = -log q_0(z_0) + log q_1(z_1) - log N(z_1; 0, I)      (exact identity),
and with gamma_1 = 20 (alpha_1 = 4.5e-5) the last two terms differ by about alpha_1 |mu| |z_1|
< 1e-4 nats per dimension, so -log p_ODE(z_0) = -log q_0(z_0) to well within the acceptance
tolerance of 1e-3 nats per dimension. Tolerances: 1e-3 nats per dimension for the solver
(rtol = atol = 1e-5), and 3 standard errors for Hutchinson estimates.
"""
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
from scipy import special, stats

from vdm_jax import decoders
from vdm_jax import likelihood
from vdm_jax import ode_likelihood
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture

PER_DIM_TOL = 1e-3  # nats per dimension (the acceptance tolerance)
GAMMA_0, GAMMA_1 = -13.3, 20.0
SCHEDULES = {"fixed_linear": schedules.fixed_linear(GAMMA_0, GAMMA_1),
             "cosine": schedules.cosine(GAMMA_0, GAMMA_1)}
MU, STD, DIM = 0.3, 0.5, 4
MEANS = np.array([[1.0, 0.0], [-0.8, 0.6], [0.0, -1.2]])
STDS, WEIGHTS = np.array([0.3, 0.5, 0.2]), np.array([0.3, 0.5, 0.2])


def _alpha2_sigma2(gamma):
  return special.expit(-gamma), special.expit(gamma)


def _mixture_nll(z, means, stds, weights, gamma):
  """-log sum_k w_k N(z; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), float64, [B]."""
  z, means = np.asarray(z, np.float64), np.asarray(means, np.float64)
  alpha2, sigma2 = _alpha2_sigma2(gamma)
  var = alpha2 * np.square(stds) + sigma2  # [K]
  sq = np.sum(np.square(z[:, None, :] - np.sqrt(alpha2) * means), -1)  # [B, K]
  logits = np.log(weights) - 0.5 * z.shape[1] * np.log(2 * np.pi * var) - 0.5 * sq / var
  return -special.logsumexp(logits, axis=1)


def _gaussian_nll(z, gamma):
  return _mixture_nll(z, np.full((1, z.shape[1]), MU), np.array([STD]), np.array([1.0]), gamma)


def _gaussian_z0(seed, num):
  alpha2, sigma2 = _alpha2_sigma2(GAMMA_0)
  rng = np.random.default_rng(seed)
  x = MU + STD * rng.normal(size=(num, DIM))
  return (np.sqrt(alpha2) * x + np.sqrt(sigma2) * rng.normal(size=(num, DIM))).astype(np.float32)


def _solve(eps_fn, gamma_fn, **options):
  return jax.jit(lambda z, key: likelihood.ode_nll(eps_fn, gamma_fn, z, key, **options))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_exact_trace_equals_the_gaussian_density_of_z0(schedule):
  z = _gaussian_z0(seed=0, num=6)
  nll, info = _solve(gaussian_mixture.gaussian_eps_fn(MU, STD, DIM), SCHEDULES[schedule],
                     exact_trace=True)(z, jax.random.PRNGKey(0))
  print(f"{schedule}: max error {np.max(np.abs(nll - _gaussian_nll(z, GAMMA_0))) / DIM:.2e} "
        f"nats/dim, nfe {int(info['nfe'])}")
  np.testing.assert_allclose(nll, _gaussian_nll(z, GAMMA_0), rtol=0, atol=PER_DIM_TOL * DIM)
  np.testing.assert_allclose(nll, info["prior"] - info["divergence"], rtol=1e-6)


def test_nll_is_the_change_of_variables_identity_with_the_vdm_schedule():
  # gamma_1 = 5: q_1 != N(0, I) by about 3e-3 nats/dim, which the identity accounts for.
  z = _gaussian_z0(seed=1, num=6)
  nll, info = _solve(gaussian_mixture.gaussian_eps_fn(MU, STD, DIM), schedules.fixed_linear(),
                     exact_trace=True)(z, jax.random.PRNGKey(0))
  z_1 = np.asarray(info["z_1"], np.float64)
  prior = 0.5 * np.sum(np.square(z_1), -1) + 0.5 * DIM * np.log(2 * np.pi)
  expected = _gaussian_nll(z, GAMMA_0) - _gaussian_nll(z_1, 5.0) + prior
  np.testing.assert_allclose(nll, expected, rtol=0, atol=PER_DIM_TOL * DIM)
  assert np.max(np.abs(expected - _gaussian_nll(z, GAMMA_0))) > PER_DIM_TOL * DIM  # it matters


def _hutchinson_check(eps_fn, z, exact, probe, num_keys=32):
  """Mean over num_keys probe draws vs the exact-trace value, batch total, within 3 SE.

  The total over the batch sums independent draws, which keeps its distribution close to
  normal (one Gaussian-probe estimate is skewed: it scales the divergence by chi^2_D / D).
  """
  solve = _solve(eps_fn, SCHEDULES["fixed_linear"], probe=probe)
  draws = np.stack([solve(z, jax.random.PRNGKey(100 + i))[0] for i in range(num_keys)])
  totals = draws.sum(axis=1)
  stderr = totals.std(ddof=1) / math.sqrt(num_keys)
  print(f"{probe}: mean - exact {totals.mean() - exact.sum():+.4f} nats, "
        f"standard error {stderr:.4f}")
  assert stderr > 0
  assert abs(totals.mean() - exact.sum()) <= 3 * stderr + PER_DIM_TOL * z.size


def test_hutchinson_agrees_with_the_exact_trace_for_gaussian_data():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z = _gaussian_z0(seed=2, num=16)
  exact, _ = _solve(eps_fn, SCHEDULES["fixed_linear"], exact_trace=True)(z, jax.random.PRNGKey(0))
  # The Jacobian is a multiple of I here, so Rademacher probes (v^T v = D) are exact ...
  rademacher, _ = _solve(eps_fn, SCHEDULES["fixed_linear"])(z, jax.random.PRNGKey(1))
  np.testing.assert_allclose(rademacher, exact, rtol=0, atol=PER_DIM_TOL * DIM)
  # ... and Gaussian probes are unbiased with a spread.
  _hutchinson_check(eps_fn, z, np.asarray(exact), "gaussian")


def test_exact_trace_equals_the_2d_mixture_density_and_hutchinson_agrees():
  eps_fn = gaussian_mixture.mixture_eps_fn(MEANS, STDS, WEIGHTS)
  z = np.asarray(gaussian_mixture.sample_mixture(jax.random.PRNGKey(3), 6, MEANS, STDS, WEIGHTS,
                                                 gamma_0=GAMMA_0))
  z = np.concatenate([z, [[0.1, 0.3], [2.5, -2.0]]]).astype(np.float32)  # between modes, tail
  exact, info = _solve(eps_fn, SCHEDULES["fixed_linear"], exact_trace=True)(z,
                                                                            jax.random.PRNGKey(0))
  expected = _mixture_nll(z, MEANS, STDS, WEIGHTS, GAMMA_0)
  print(f"mixture: max error {np.max(np.abs(exact - expected)) / 2:.2e} nats/dim, "
        f"nfe {int(info['nfe'])}")
  np.testing.assert_allclose(exact, expected, rtol=0, atol=PER_DIM_TOL * 2)
  _hutchinson_check(eps_fn, z, np.asarray(exact), "rademacher")


def test_nfe_counts_the_network_calls():
  calls = []
  base = gaussian_mixture.mixture_eps_fn(MEANS, STDS, WEIGHTS)

  def eps_fn(z, gamma):
    jax.debug.callback(lambda: calls.append(1))
    return base(z, gamma)

  _, info = _solve(eps_fn, SCHEDULES["fixed_linear"])(np.zeros((2, 2), np.float32),
                                                      jax.random.PRNGKey(0))
  assert int(info["nfe"]) == len(calls) > 6


# Discrete data ----------------------------------------------------------------------------------

VOCAB, PROBS = 4, np.array([0.1, 0.2, 0.3, 0.4])


def _discrete_eps_fn():
  """The optimal eps_hat for x_i iid ~ PROBS (a mixture of zero-width components per dimension)."""
  centres = np.asarray(decoders.encode(np.arange(VOCAB), VOCAB))[:, None]
  per_dim = gaussian_mixture.mixture_eps_fn(centres, np.zeros(VOCAB), PROBS)

  def eps_fn(z, gamma):
    return per_dim(z.reshape(-1, 1), jnp.repeat(gamma, math.prod(z.shape[1:]))).reshape(z.shape)

  return eps_fn


@pytest.mark.parametrize("dequantization", ["variational", "truncated_normal"])
def test_discrete_bounds_recover_log_p_of_x_with_the_exact_denoiser(dequantization):
  # The bin centres are 0.5 apart against sigma_0 = 1.3e-3, so q(z_0 | x) and the decoder put
  # all but exp(-10^4) of their mass on x's own component: the bound is tight, every sample
  # equals -log P(x). The spiky density needs rtol = atol = 1e-6 for 1e-3 nats/dim.
  x = np.random.default_rng(4).choice(VOCAB, size=(6, 2, 2, 1), p=PROBS)
  eps_fn = _discrete_eps_fn()
  loss_fn = ode_likelihood.ode_loss_fn(lambda p, b: eps_fn,
                                       lambda p: SCHEDULES["fixed_linear"],
                                       dequantization=dequantization, vocab_size=VOCAB,
                                       exact_trace=True, rtol=1e-6, atol=1e-6)
  loss, terms = jax.jit(loss_fn)(None, {"image": x}, jax.random.PRNGKey(5))
  np.testing.assert_allclose(loss, -np.sum(np.log(PROBS[x]), axis=(1, 2, 3)), atol=PER_DIM_TOL * 4)
  nfe = terms.pop("nfe")  # a count beside the nats: Tsit5's 6 evaluations per step, plus 1
  np.testing.assert_allclose(sum(terms.values()), loss, rtol=1e-6)
  assert nfe.shape == loss.shape and np.all(nfe == nfe[0]) and nfe[0] % 6 == 1 and nfe[0] > 1
  gamma_fn = SCHEDULES["fixed_linear"]
  key_dequantize, _ = jax.random.split(jax.random.PRNGKey(5))  # as loss_fn splits its key
  z_0, _ = ode_likelihood.DEQUANTIZERS[dequantization](x, gamma_fn(jnp.zeros(6)), key_dequantize,
                                                        vocab_size=VOCAB)
  _, info = ode_likelihood.ode_nll(eps_fn, gamma_fn, z_0, None, exact_trace=True, rtol=1e-6,
                                   atol=1e-6)
  assert nfe[0] == info["nfe"]  # the solve's own count


def test_uniform_bound_matches_its_closed_form_for_a_gaussian_model():
  # Model: p_ODE = q_0 of x ~ N(MU, STD^2) (the Gaussian denoiser). For z_0 = alpha_0 y, y
  # uniform on x's bin (mean f, variance 1 / (3 V^2) per dimension),
  # E[loss] = E[-log q_0(alpha_0 y)] + D log(V / (2 alpha_0)) in closed form.
  vocab, num = 16, 64
  x = np.random.default_rng(6).integers(0, vocab, size=(1, 2, 2, 1))
  loss_fn = ode_likelihood.ode_loss_fn(
      lambda p, b: lambda z, g: gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)(
          z.reshape(-1, DIM), g).reshape(z.shape),
      lambda p: SCHEDULES["fixed_linear"], dequantization="uniform", vocab_size=vocab,
      exact_trace=True)
  loss, _ = jax.jit(loss_fn)(None, {"image": np.repeat(x, num, 0)}, jax.random.PRNGKey(7))
  alpha2, sigma2 = _alpha2_sigma2(GAMMA_0)
  var = alpha2 * STD**2 + sigma2
  f = np.asarray(decoders.encode(x, vocab), np.float64).reshape(-1)
  second_moment = np.square(np.sqrt(alpha2) * (f - MU)) + alpha2 / (3 * vocab**2)
  expected = np.sum(0.5 * second_moment / var + 0.5 * np.log(2 * np.pi * var))
  expected += DIM * np.log(vocab / (2 * np.sqrt(alpha2)))
  stderr = np.std(loss, ddof=1) / math.sqrt(num)
  assert abs(np.mean(loss) - expected) <= 3 * stderr + PER_DIM_TOL * DIM


@pytest.mark.parametrize("name", ["uniform", "truncated_normal"])
def test_dequantized_latents_stay_in_their_bins_and_log_q_is_the_density(name):
  vocab, gamma_0 = 8, -6.0  # tau = exp(3) / 8 = 2.5: the truncation is active
  x = np.random.default_rng(8).integers(0, vocab, size=(512, 1, 1, 1))
  z_0, terms = ode_likelihood.DEQUANTIZERS[name](x, jnp.full((512,), gamma_0),
                                                 jax.random.PRNGKey(9), vocab_size=vocab)
  alpha = math.sqrt(special.expit(-gamma_0))
  y = np.asarray(z_0, np.float64).reshape(-1) / alpha
  f = np.asarray(decoders.encode(x, vocab), np.float64).reshape(-1)
  assert np.all(np.abs(y - f) <= 1.0 / vocab * (1 + 1e-5))
  if name == "uniform":
    expected = np.full_like(y, np.log(vocab / (2 * alpha)))
  else:
    sigma = math.sqrt(special.expit(gamma_0))
    tau = math.exp(-gamma_0 / 2) / vocab
    expected = stats.truncnorm.logpdf(y * alpha, -tau, tau, loc=alpha * f, scale=sigma)
  np.testing.assert_allclose(terms["dequantization"], expected, rtol=1e-5, atol=1e-5)


# Sharding and evaluate_bpd ----------------------------------------------------------------------

SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from vdm_jax import likelihood, schedules
    from vdm_jax.testing import gaussian_mixture

    EPS_FN = gaussian_mixture.gaussian_eps_fn(0.0, 0.5, 12)
    FLAT_EPS_FN = lambda z, g: EPS_FN(z.reshape(z.shape[0], -1), g).reshape(z.shape)
    Z = np.random.default_rng(10).normal(size=(16, 12)).astype(np.float32)
    IMAGES = np.random.default_rng(11).integers(0, 256, (13, 2, 2, 3)).astype(np.uint8)
    LOSS_FN = likelihood.ode_loss_fn(lambda p, b: FLAT_EPS_FN, lambda p: schedules.fixed_linear(),
                                     dequantization="truncated_normal")

    def sharded_nll():
      mesh = Mesh(np.asarray(jax.devices()), ("data",))
      z = jax.device_put(Z, NamedSharding(mesh, PartitionSpec("data")))
      nll, _ = jax.jit(lambda z, k: likelihood.ode_nll(EPS_FN, schedules.fixed_linear(), z, k))(
          z, jax.random.PRNGKey(12))
      return np.asarray(nll).tolist()

    def bpd(batch_size):
      batches = [{"image": IMAGES[i:i + batch_size]} for i in range(0, len(IMAGES), batch_size)]
      return likelihood.evaluate_bpd(LOSS_FN, batches, jax.random.PRNGKey(13))
""")
namespace = {}
exec(SETUP, namespace)  # pylint: disable=exec-used


@pytest.fixture(scope="module")
def one_device_bpd():
  return namespace["bpd"](5)  # batches of 5, 5, 3


def test_evaluate_bpd_with_the_ode_loss_counts_each_example_once(one_device_bpd):
  loss_fn = jax.jit(namespace["LOSS_FN"])
  keys = [jax.random.fold_in(jax.random.PRNGKey(13), n) for n in range(len(namespace["IMAGES"]))]
  direct = [float(loss_fn(None, {"image": image[None]}, key)[0][0])
            for image, key in zip(namespace["IMAGES"], keys, strict=True)]
  np.testing.assert_allclose(one_device_bpd["bpd"], np.mean(direct) / (12 * math.log(2)), rtol=1e-5)
  terms = one_device_bpd["prior"] + one_device_bpd["flow"] + one_device_bpd["dequantization"]
  np.testing.assert_allclose(terms, one_device_bpd["bpd"], rtol=1e-5)


def test_sharded_batch_on_eight_devices_matches_one_device(one_device_bpd):
  code = SETUP + "\nimport json\nassert jax.device_count() == 8\n" \
      "print(json.dumps({'nll': sharded_nll(), 'bpd': bpd(5)['bpd']}))\n"
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(eight["nll"], namespace["sharded_nll"](), rtol=1e-5)
  np.testing.assert_allclose(eight["bpd"], one_device_bpd["bpd"], rtol=1e-5)


def test_bad_inputs_raise_value_error():
  eps_fn, gamma_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM), schedules.fixed_linear()
  z, key = np.zeros((2, DIM), np.float32), jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_probes"):
    likelihood.ode_nll(eps_fn, gamma_fn, z, key, num_probes=0)
  with pytest.raises(ValueError, match="probe must be one of"):
    likelihood.ode_nll(eps_fn, gamma_fn, z, key, probe="sphere")
  with pytest.raises(ValueError, match="rtol and atol"):
    likelihood.ode_nll(eps_fn, gamma_fn, z, key, rtol=0.0)
  with pytest.raises(ValueError, match="batch axis"):
    likelihood.ode_nll(eps_fn, gamma_fn, np.zeros((DIM,), np.float32), key)
  with pytest.raises(ValueError, match="gamma_fn must map"):
    likelihood.ode_nll(eps_fn, lambda t: jnp.zeros(()), z, key)
  with pytest.raises(ValueError, match="dequantization must be one of"):
    likelihood.ode_loss_fn(lambda p, b: eps_fn, lambda p: gamma_fn, dequantization="flow++")
