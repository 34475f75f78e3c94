"""Parity of the math core with google-research/vdm (tests/fixtures/vdm_reference).

The score network is not under test here: the losses are fed the stored eps_hat
(computed by the reference network on the stored z_t, g_t), and each schedule is
rebuilt from its stored parameters with the formula the fixture README documents.
Tolerances (float32) follow the fixture README unless derived below.
"""
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules

FIXTURES = ["fixed", "learnable_scalar", "learnable_nnet", "cond64_learnable_scalar"]
ULP = 2.0**-24  # unit roundoff of float32


def _gamma_fn(reference_dir, name):
  """The reference schedule of fixture `name` as a gamma_fn, from its stored parameters."""
  if name == "fixed":
    return schedules.fixed_linear(-13.3, 5.0)
  tree = flax.serialization.msgpack_restore((reference_dir / f"params_{name}.msgpack").read_bytes())
  p = jax.tree_util.tree_map(jnp.asarray, tree["params"]["gamma"])
  if "w" in p:  # learnable_scalar: gamma(t) = b + |w| t
    return lambda t: p["b"] + jnp.abs(p["w"]) * t

  def monotone_mlp(t):  # learnable_nnet, README "Noise schedules"
    u = jnp.reshape(t, (-1, 1))
    l1 = u @ jnp.abs(p["l1"]["kernel"]) + p["l1"]["bias"]
    h = 2.0 * (jax.nn.sigmoid((2.0 * u - 1.0) @ jnp.abs(p["l2"]["kernel"]) + p["l2"]["bias"]) - 0.5)
    return jnp.reshape(l1 + h @ jnp.abs(p["l3"]["kernel"]) / 1024.0, jnp.shape(t))

  return monotone_mlp


@pytest.fixture(scope="module")
def inputs(reference_dir):
  return dict(np.load(reference_dir / "inputs.npz"))


def _outputs(reference_dir, name):
  return dict(np.load(reference_dir / f"outputs_{name}.npz"))


def _recon_tolerance(x, z_0, gamma_0, u):
  r"""Float32 bound on |loss_recon(ours) - loss_recon(reference)|, per example.

  Both decoders evaluate the scaled residual r_v = (z_0 - alpha_0 e_v) / sigma_0, we from
  z_0 = alpha_0 f + sigma_0 eps0 and the reference from u = f + exp(gamma_0/2) eps0 = z_0/alpha_0.
  Rounding z_0 (|dz| <= ulp |z_0|) and u (|du| <= ulp |u|, i.e. dz = alpha_0 du) shifts every
  r_v of a dimension by the same amount, so |dL| <= sum_i |dL/dz_0,i| (|dz_i| + alpha_0 |du_i|).
  The few further roundings (products, subtractions) are covered by a factor 4.
  """
  grad = jax.grad(lambda z: jnp.sum(losses.reconstruction_loss(x, z, gamma_0)))(z_0)
  alpha_0 = math.sqrt(1.0 / (1.0 + math.exp(float(gamma_0))))
  per_dim = np.abs(grad) * ULP * (np.abs(z_0) + alpha_0 * np.abs(u))
  return 4.0 * per_dim.reshape(per_dim.shape[0], -1).sum(-1) + 1e-6


@pytest.mark.parametrize("name", FIXTURES)
def test_schedule_gamma_and_its_jvp_derivative_match_the_reference_grid(reference_dir, inputs, name):
  out = _outputs(reference_dir, name)
  gamma_fn = _gamma_fn(reference_dir, name)
  gamma, dgamma = jax.jit(lambda t: jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),)))(inputs["t_grid"])
  np.testing.assert_allclose(gamma, out["gamma_grid"], rtol=1e-6, atol=1e-6 * np.abs(out["gamma_grid"]).max())
  np.testing.assert_allclose(dgamma, out["dgamma_grid"], rtol=1e-6)
  ends = gamma_fn(jnp.asarray([0.0, 1.0]))
  np.testing.assert_allclose(ends, [out["gamma_0"], out["gamma_1"]], rtol=1e-6)
  np.testing.assert_allclose(jax.nn.sigmoid(ends), np.ravel([out["var_0"], out["var_1"]]), rtol=1e-6)


@pytest.mark.parametrize("name", FIXTURES)
def test_encoder_forward_sample_and_loss_terms_match_the_reference(reference_dir, inputs, name):
  out = _outputs(reference_dir, name)
  gamma_fn = _gamma_fn(reference_dir, name)
  x, t, eps, eps0 = inputs["x"], inputs["t"], inputs["eps"], inputs["eps0"]
  np.testing.assert_array_equal(decoders.encode(x), out["f"])
  z_t = jax.jit(gaussian.sample_forward)(out["f"], gamma_fn(t), eps)
  np.testing.assert_allclose(z_t, out["z_t"], rtol=0, atol=8 * ULP * np.abs(out["z_t"]).max())

  run = jax.jit(lambda eps_hat, num_steps: losses.vdm_loss_from_noise(
      lambda z, g: eps_hat, gamma_fn, x, t, eps, eps0, num_steps=num_steps), static_argnums=1)
  loss, terms = run(out["eps_hat"], 0)
  _, terms_t10 = run(out["eps_hat_T10"], int(inputs["T_discrete"]))

  # The reference's float32 KL has a cancellation; README: ~2e-5 relative to float64.
  np.testing.assert_allclose(terms["prior"], out["loss_klz"], rtol=5e-5)
  z_0 = gaussian.sample_forward(out["f"], out["gamma_0"], eps0)
  recon_tol = _recon_tolerance(x, z_0, out["gamma_0"], out["recon_z0_rescaled"])
  assert np.all(np.abs(terms["reconstruction"] - out["loss_recon"]) <= recon_tol)
  np.testing.assert_allclose(terms["diffusion"], out["loss_diff"], rtol=1e-5)
  np.testing.assert_allclose(terms_t10["diffusion"], out["loss_diff_T10"], rtol=1e-5)

  num_dims = int(np.prod(x.shape[1:]))
  loss_tol = recon_tol + 5e-5 * out["loss_klz"] + 1e-5 * out["loss_diff"]
  np.testing.assert_array_less(np.abs(losses.bits_per_dim(loss, num_dims) - out["bpd"]),
                               loss_tol / (num_dims * math.log(2)) + 1e-6 * out["bpd"])
  np.testing.assert_allclose(losses.bits_per_dim(jnp.mean(loss), num_dims), out["bpd_mean"], rtol=1e-5)


@pytest.mark.parametrize("name", FIXTURES)
def test_discrete_time_rounding_and_antithetic_times_match_the_reference(reference_dir, inputs, name):
  out = _outputs(reference_dir, name)
  gamma_fn = _gamma_fn(reference_dir, name)
  t_up, s = losses.round_up_to_grid(jnp.asarray(inputs["t"]), int(inputs["T_discrete"]))
  np.testing.assert_array_equal(t_up, out["t_T10"])
  np.testing.assert_array_equal(s, out["s_T10"])
  np.testing.assert_allclose(gamma_fn(t_up), out["g_t_T10"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gamma_fn(s), out["g_s_T10"], rtol=1e-6, atol=1e-6)
  anti_t = losses.antithetic_times(jnp.asarray(inputs["anti_t0"]), 4)
  np.testing.assert_array_equal(anti_t, out["anti_t"])
  np.testing.assert_allclose(gamma_fn(anti_t), out["anti_g_t"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["fixed", "learnable_nnet"])
def test_categorical_decoder_matches_reference_logprobs_and_argmax(reference_dir, inputs, name):
  out = _outputs(reference_dir, name)
  z_0, gamma_0 = inputs["decode_z0"], out["gamma_0"]
  logprobs = jax.jit(decoders.categorical_logprobs)(z_0, gamma_0)
  ref = out["decode_logprobs_px2"]
  ours = np.asarray(logprobs)[0, 0, :2]
  # Residuals r_v = (z_0/alpha_0 - e_v) exp(-gamma_0/2) are formed from differently rounded
  # inputs (z_0 vs z_0/alpha_0): |dr| <= 4 ulp |z_0/alpha_0| exp(-gamma_0/2); a logit
  # -r^2/2 moves by |r| |dr|, its log_softmax by at most |r_v| |dr| + max_w |r_w| |dr|.
  u = z_0[0, 0, :2] / math.sqrt(1.0 - float(out["var_0"]))
  inv_std = math.exp(-0.5 * float(gamma_0))
  r = (u[..., None] - decoders.encode(np.arange(256))) * inv_std
  dr = 4 * ULP * np.abs(u)[..., None] * inv_std
  bound = dr * (np.abs(r) + np.abs(r).max(-1, keepdims=True)) + 1e-6 * np.abs(ref) + 1e-6
  assert np.all(np.abs(ours - ref) <= bound)
  np.testing.assert_array_equal(decoders.decode(z_0, gamma_0), out["decode_x"])
