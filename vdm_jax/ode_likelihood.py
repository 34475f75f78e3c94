r"""Exact log-likelihood through the probability-flow ODE, and bits/dim of discrete data from it.

Probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", eq. 13) of the variance-preserving process
q(z_t | x) = N(alpha_t x, sigma_t^2 I). With f(t) = d log alpha_t / dt = -0.5 sigma_t^2 gamma'(t),
g(t)^2 = sigma_t^2 gamma'(t) and the score -eps_hat / sigma_t, the drift
f z - 0.5 g^2 score written in gamma = -log SNR as the time variable is

  dz / dgamma = 0.5 (sigma eps_hat(z, gamma) - sigma^2 z),   sigma^2 = sigmoid(gamma).

It depends on the schedule only through its endpoints gamma_0 = gamma(0), gamma_1 = gamma(1)
(any increasing gamma_fn with the same endpoints gives the same map z_0 -> z_1). The solver
runs in s = (gamma - gamma_0) / (gamma_1 - gamma_0) in [0, 1], linear in log-SNR:

  dz / ds = 0.5 (gamma_1 - gamma_0) sigma (eps_hat(z, gamma) - sigma z).

Instantaneous change of variables (Chen et al. 2018, "Neural Ordinary Differential
Equations"; Grathwohl et al. 2019, FFJORD): log p_0(z_0) = log p_1(z_1) + int_0^1 div(dz/ds) ds,

  div(dz/ds) = 0.5 (gamma_1 - gamma_0) sigma tr(d eps_hat / dz - sigma I).

tr is exact (D Jacobian-vector products) or the Hutchinson-Skilling estimate
E_v[v^T (J - sigma I) v] with probes v fixed along the path (Hutchinson 1989; Skilling 1989;
used in FFJORD). At high noise J ~ sigma I (eps_hat ~ z / sigma), so the -sigma I inside the
probe product removes most of the estimator's variance (for Rademacher probes it changes
nothing else: v^T v = D). The prior at t = 1 is N(0, I).

Discrete data get an upper bound on -log P(x) from a dequantizer q(z_0 | x) (Theis et al.
2016; Ho et al. 2019; Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
Estimation for Diffusion ODEs", i-DODE):
  -log P(x) <= E_q[-log p_ODE(z_0) + log q(z_0 | x)]          (uniform, truncated_normal)
  -log P(x) <= E_q[-log p(x | z_0) - log p_ODE(z_0) + log q(z_0 | x)]   (variational)
All quantities are nats per example, summed over H, W, C, shape [B].
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

from vdm_jax import _numerics
from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax import losses
from vdm_jax import schedules
from vdm_jax.typing import EpsFn, GammaFn, LossFn, Params, PRNGKey, Terms

PROBES: tuple[str, ...] = ("rademacher", "gaussian")


def _max_example_rms(tree):
  """Error norm for the step-size controller: max over examples of the per-example RMS.

  The state is (z [B, ...], log-density integral [B]); every example gets the tolerance it
  would get if it were solved alone, although all share the steps.
  """
  z, logp = tree
  sums = _numerics.sum_per_example(jnp.square(z)) + jnp.square(logp)
  return jnp.max(jnp.sqrt(sums / (math.prod(z.shape[1:]) + 1)))


def _draw_probes(key, probe, num_probes, shape):
  """[K, B, ...] probes with E[v v^T] = I: Rademacher (+-1) or standard normal."""
  if probe == "rademacher":
    return jax.random.rademacher(key, (num_probes,) + shape, jnp.float32)
  return jax.random.normal(key, (num_probes,) + shape, jnp.float32)


def _eps_and_trace(eps_fn, z, gamma, sigma, probes):
  """eps_hat(z, gamma) [B, ...] and tr(d eps_hat / dz - sigma I) per example [B].

  probes None: exact, from D Jacobian-vector products with the unit vectors; else the
  Hutchinson mean over the K probes [K, B, ...] of v^T (J - sigma I) v. Keeping sigma I inside
  the probe product cancels the part of J that is close to sigma I (eps_hat ~ z / sigma at
  high noise) before it can add variance.
  """
  batch, dim = z.shape[0], math.prod(z.shape[1:])
  eps_hat, jvp_fn = jax.linearize(lambda u: eps_fn(u, gamma), z)
  if probes is None:
    units = jnp.broadcast_to(jnp.eye(dim, dtype=z.dtype)[:, None, :], (dim, batch, dim))
    columns = jax.vmap(jvp_fn)(units.reshape((dim,) + z.shape)).reshape(dim, batch, dim)
    return eps_hat, jnp.einsum("ibi->b", columns) - dim * sigma
  sigma = gaussian.broadcast_to_data(sigma, probes.ndim - 1)
  products = (jax.vmap(jvp_fn)(probes) - sigma * probes) * probes
  return eps_hat, jnp.mean(jnp.sum(products.reshape(probes.shape[:2] + (-1,)), axis=-1), axis=0)


def _solve_flow(eps_fn, z, gamma_0, gamma_1, probes, rtol, atol, max_steps):
  """(z_1, divergence [B], num_steps) of the flow in s in [0, 1] (see `ode_nll`), diffrax Tsit5."""
  import diffrax  # pylint: disable=g-import-not-at-top  (imported when used: ~2 s on 2 cores)
  span = gamma_1 - gamma_0

  def vector_field(s, state, args):
    del args
    z_s = state[0]
    gamma = gamma_0 + span * s
    sigma = schedules.sigma(gamma)
    eps_hat, trace = _eps_and_trace(eps_fn, z_s, gamma, sigma, probes)
    scale = gaussian.broadcast_to_data(0.5 * span * sigma, z_s.ndim)
    dz = scale * (eps_hat - gaussian.broadcast_to_data(sigma, z_s.ndim) * z_s)
    return dz, 0.5 * span * sigma * trace

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=1.0, dt0=None,
      y0=(z, jnp.zeros(z.shape[:1], jnp.float32)), saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_max_example_rms),
      max_steps=max_steps)
  return solution.ys[0][-1], solution.ys[1][-1], solution.stats["num_steps"]


def _check_solver_options(num_probes, probe, rtol, atol, max_steps):
  if not (_numerics.is_int(num_probes) and num_probes >= 1):
    raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
  if probe not in PROBES:
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be > 0, got rtol={rtol!r}, atol={atol!r}")
  if not (_numerics.is_int(max_steps) and max_steps >= 1):
    raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")


def ode_nll(eps_fn: EpsFn, gamma_fn: GammaFn, z: jax.typing.ArrayLike, key: PRNGKey, *,
            num_probes: int = 1, exact_trace: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
            probe: str = "rademacher",
            max_steps: int = 4096) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""-log p_ODE(z): exact likelihood of z at t = 0 under the probability-flow ODE, prior N(0, I).

  Solves (Tsit5, PID step-size control with rtol, atol; Song et al. 2021, eq. 13; Chen et
  al. 2018; Grathwohl et al. 2019) for s from 0 to 1, gamma = gamma_0 + (gamma_1 - gamma_0) s:
    dz / ds = 0.5 (gamma_1 - gamma_0) sigma (eps_hat(z, gamma) - sigma z),     z(0) = z,
    dI / ds = 0.5 (gamma_1 - gamma_0) sigma tr(d eps_hat / dz - sigma I),    I(0) = 0,
  with sigma = sqrt(sigmoid(gamma)); then, with z_1 = z(1),
    divergence = I(1)                                 (= int_0^1 div(dz/ds) ds)
    prior      = 0.5 ||z_1||^2 + 0.5 D log(2 pi)      (= -log N(z_1; 0, I))
    nll        = prior - divergence.
  The trace is exact (exact_trace=True: D Jacobian-vector products per evaluation, for small
  D) or the Hutchinson-Skilling estimate mean_k v_k^T (J - sigma I) v_k with num_probes probes
  drawn once from key (unbiased for nll). All examples share the adaptive steps; the error
  norm is the largest per-example RMS, so each example meets rtol, atol as if solved alone.

  Args:
    eps_fn: (z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]; examples must not interact.
    gamma_fn: t [B] -> gamma [B], increasing; only gamma(0) and gamma(1) are used.
    z: latent at t = 0 (e.g. z_0 = alpha_0 f + sigma_0 eps0), [B, H, W, C] (any [B, ...]).
    key: PRNG key for the probes (unused with exact_trace).
    num_probes: K >= 1 Hutchinson probes per example.
    exact_trace: compute tr(J) exactly instead of estimating it.
    rtol, atol: tolerances of the PID controller (diffrax.PIDController).
    probe: "rademacher" (default; lower variance) or "gaussian".
    max_steps: solver step limit; reaching it raises an error (raise it or loosen rtol, atol).

  Returns:
    (nll [B], info): nll in nats per example, summed over H, W, C; info holds [B] arrays
    "prior" and "divergence" (nats, nll = prior - divergence), "z_1" [B, ...], and int32
    scalars "nfe" (eps_fn evaluations on the batch, 6 per Tsit5 step plus 1, as counted by
    a callback in the network) and "num_steps" (accepted plus rejected steps).
  """
  _check_solver_options(num_probes, probe, rtol, atol, max_steps)
  z = jnp.asarray(z, jnp.float32)
  if z.ndim < 2:
    raise ValueError(f"z must be [B, ...] with at least 2 axes, got shape {z.shape}; "
                     "add a batch axis")
  batch, dim = z.shape[0], math.prod(z.shape[1:])
  gamma_0, gamma_1 = gamma_fn(jnp.zeros((batch,))), gamma_fn(jnp.ones((batch,)))
  if jnp.shape(gamma_0) != (batch,) or jnp.shape(gamma_1) != (batch,):
    raise ValueError(f"gamma_fn must map t [{batch}] to gamma [{batch}], got "
                     f"{jnp.shape(gamma_0)}; broadcast a scalar schedule to the batch")
  probes = None if exact_trace else _draw_probes(key, probe, num_probes, z.shape)
  z_1, divergence, num_steps = _solve_flow(eps_fn, z, gamma_0, gamma_1, probes, rtol, atol,
                                           max_steps)
  prior = 0.5 * _numerics.sum_per_example(jnp.square(z_1)) + 0.5 * dim * math.log(2.0 * math.pi)
  info = {"prior": prior, "divergence": divergence, "z_1": z_1, "num_steps": num_steps,
          "nfe": 6 * num_steps + 1}
  return prior - divergence, info


# Discrete data: dequantizers q(z_0 | x) and the bits/dim loss for likelihood.evaluate_bpd. ------


def _gaussian_log_density(eps, gamma_0):
  """log N(z_0; alpha_0 f, sigma_0^2 I) at z_0 = alpha_0 f + sigma_0 eps, per example [B]."""
  log_var = -jax.nn.softplus(-gamma_0)  # log sigma_0^2 = log sigmoid(gamma_0)
  dim = math.prod(eps.shape[1:])
  squared = _numerics.sum_per_example(jnp.square(eps))
  return -0.5 * squared - 0.5 * dim * (math.log(2.0 * math.pi) + log_var)


def uniform_dequantization(x: jax.typing.ArrayLike, gamma_0: jax.Array, key: PRNGKey, *,
                           vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""Uniform dequantization into the ODE's variable z_0 (Theis et al. 2016; Song et al. 2021).

  With f = 2 (x + 0.5) / V - 1, x's bin in the encoded scale is [f - 1/V, f + 1/V] (width 2/V):
    y = f + (2 u - 1) / V,  u ~ U(0, 1)^D,      z_0 = alpha_0 y,
  so q(z_0 | x) is uniform on alpha_0 * bin(x), volume (2 alpha_0 / V)^D, and
    log q(z_0 | x) = D log(V / 2) - D log alpha_0 = D (log(V / 2) + 0.5 softplus(gamma_0)).
  The ODE density is over z_0 (the latent at t = 0), hence the scaling by alpha_0: the data
  term of -log P(x) <= E_q[-log p_ODE(z_0) + log q(z_0 | x)] then measures the model's
  density of the dequantized data y, -log p_Y(y) = -log p_ODE(alpha_0 y) - D log alpha_0.

  Args:
    x: integers in {0, ..., V-1}, [B, H, W, C].
    gamma_0: gamma(0), [B].
    key: PRNG key for u.
    vocab_size: V.

  Returns:
    (z_0 [B, H, W, C], {"dequantization": log q(z_0 | x) [B] nats}).
  """
  f = decoders.encode(x, vocab_size)
  u = jax.random.uniform(key, f.shape)
  alpha_0 = schedules.alpha(gaussian.broadcast_to_data(gamma_0, f.ndim))
  z_0 = alpha_0 * (f + (2.0 * u - 1.0) / vocab_size)
  dim = math.prod(f.shape[1:])
  log_q = dim * (math.log(0.5 * vocab_size) + 0.5 * jax.nn.softplus(gamma_0))
  return z_0, {"dequantization": log_q}


def variational_dequantization(x: jax.typing.ArrayLike, gamma_0: jax.Array, key: PRNGKey, *,
                               vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""VDM's q(z_0 | x) with its categorical decoder (Kingma et al. 2021, eq. 8 and 9).

    z_0 = alpha_0 f + sigma_0 eps,  eps ~ N(0, I),
    log q(z_0 | x) = -0.5 ||eps||^2 - 0.5 D log(2 pi sigma_0^2),
    log sigma_0^2 = -softplus(-gamma_0),
    -log P(x) <= E_q[-log p(x | z_0) - log p_ODE(z_0) + log q(z_0 | x)],
  with -log p(x | z_0) the VDM decoder's reconstruction loss (losses.reconstruction_loss).
  The ELBO's prior + diffusion terms are replaced by the exact -log p_ODE(z_0) and the
  sample's log q(z_0 | x) (its expectation is minus q's entropy).

  Args:
    x: integers in {0, ..., V-1}, [B, H, W, C].
    gamma_0: gamma(0), [B].
    key: PRNG key for eps.
    vocab_size: V.

  Returns:
    (z_0 [B, H, W, C], {"reconstruction": -log p(x | z_0), "dequantization": log q(z_0 | x)}),
    each [B] nats per example.
  """
  f = decoders.encode(x, vocab_size)
  eps = jax.random.normal(key, f.shape)
  z_0 = gaussian.sample_forward(f, gamma_0, eps)
  return z_0, {"reconstruction": losses.reconstruction_loss(x, z_0, gamma_0, vocab_size),
               "dequantization": _gaussian_log_density(eps, gamma_0)}


def truncated_normal_dequantization(x: jax.typing.ArrayLike, gamma_0: jax.Array, key: PRNGKey, *,
                                    vocab_size: int = 256) -> tuple[jax.Array, Terms]:
  r"""Truncated-normal dequantization of i-DODE (Zheng et al. 2023, sec. 5), training-free.

  q(z_0 | x) is the forward marginal N(alpha_0 f, sigma_0^2 I) truncated to alpha_0 * bin(x):
    z_0 = alpha_0 f + sigma_0 eps,  eps ~ N(0, I) truncated to [-tau, tau]^D,
    tau = alpha_0 / (sigma_0 V) = exp(-gamma_0 / 2) / V   (so z_0 / alpha_0 stays in the bin),
    log q(z_0 | x) = -0.5 ||eps||^2 - 0.5 D log(2 pi sigma_0^2) - D log Z,  Z = erf(tau / sqrt 2),
    -log P(x) <= E_q[-log p_ODE(z_0) + log q(z_0 | x)].
  Close to the data the model was trained on (z_0 ~ q(z_0 | x)) while keeping every sample
  inside x's bin; no decoder is needed.

  Args:
    x: integers in {0, ..., V-1}, [B, H, W, C].
    gamma_0: gamma(0), [B].
    key: PRNG key for eps.
    vocab_size: V.

  Returns:
    (z_0 [B, H, W, C], {"dequantization": log q(z_0 | x) [B] nats}).
  """
  f = decoders.encode(x, vocab_size)
  tau = jnp.exp(-0.5 * gamma_0) / vocab_size
  tau_b = gaussian.broadcast_to_data(tau, f.ndim)
  eps = jax.random.truncated_normal(key, -tau_b, tau_b, f.shape)
  log_z = jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0)))
  log_q = _gaussian_log_density(eps, gamma_0) - math.prod(f.shape[1:]) * log_z
  return gaussian.sample_forward(f, gamma_0, eps), {"dequantization": log_q}


DEQUANTIZERS: dict[str, Callable[..., tuple[jax.Array, Terms]]] = {
    "uniform": uniform_dequantization, "variational": variational_dequantization,
    "truncated_normal": truncated_normal_dequantization}


def ode_loss_fn(eps_fn_from_params: Callable[[Params, dict], EpsFn],
                gamma_fn_from_params: Callable[[Params], GammaFn], *,
                dequantization: str = "variational", vocab_size: int = 256,
                num_probes: int = 1, exact_trace: bool = False, probe: str = "rademacher",
                rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096) -> LossFn:
  r"""A loss_fn(params, batch, key) -> (loss [B], terms) for likelihood.evaluate_bpd from the ODE.

  Upper bound on -log P(x) of integer data through the exact ODE likelihood (see the
  dequantizers for q(z_0 | x)):
    loss = prior + flow + dequantization (+ reconstruction for "variational"),
    prior = -log N(z_1; 0, I),  flow = -int_0^1 div ds,  dequantization = log q(z_0 | x),
  so prior + flow = -log p_ODE(z_0) (`ode_nll`). One loss sample per example (use
  evaluate_bpd(..., num_time_samples=1, counts=("nfe",)); K > 1 averages K dequantization
  and probe draws). The key is split into the dequantization noise and the Hutchinson
  probes. terms["nfe"] is the example's number of network evaluations (ode_nll's nfe), a
  count that is not part of the loss.

  Args:
    eps_fn_from_params: (params, batch) -> eps_fn(z_t [B, ...], gamma_t [B]); batch gives
      per-example conditioning, e.g. lambda p, b: model.eps_fn(p, labels=b.get("label")).
    gamma_fn_from_params: params -> gamma_fn(t [B]) -> gamma [B], e.g. model.gamma_fn.
    dequantization: "uniform", "variational" (VDM decoder) or "truncated_normal" (i-DODE).
    vocab_size: V.
    num_probes, exact_trace, probe, rtol, atol, max_steps: as in `ode_nll`.

  Returns:
    loss_fn(params, batch {"image": int [B, H, W, C], ...}, key) -> (loss [B] nats per
    example summed over H, W, C, terms: dict of [B] nats that sum to loss, and "nfe" [B]).
  """
  if dequantization not in DEQUANTIZERS:
    raise ValueError(f"dequantization must be one of {tuple(DEQUANTIZERS)}, got {dequantization!r}")
  _check_solver_options(num_probes, probe, rtol, atol, max_steps)
  dequantize = DEQUANTIZERS[dequantization]

  def loss_fn(params, batch, key):
    x = jnp.asarray(batch["image"])
    gamma_fn = gamma_fn_from_params(params)
    key_dequantize, key_probes = jax.random.split(key)
    gamma_0 = gamma_fn(jnp.zeros(x.shape[:1]))
    z_0, terms = dequantize(x, gamma_0, key_dequantize, vocab_size=vocab_size)
    _, info = ode_nll(eps_fn_from_params(params, batch), gamma_fn, z_0, key_probes,
                      num_probes=num_probes, exact_trace=exact_trace, probe=probe, rtol=rtol,
                      atol=atol, max_steps=max_steps)
    terms.update(prior=info["prior"], flow=-info["divergence"])
    loss = sum(terms.values())
    terms["nfe"] = jnp.broadcast_to(info["nfe"].astype(jnp.float32), loss.shape)
    return loss, terms

  return loss_fn
