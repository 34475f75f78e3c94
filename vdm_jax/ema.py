"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, EDM2).

"Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3 and
appendix C; equation numbers follow arXiv:2312.02696.

Time is counted in optimizer updates: step t = 1, 2, ... is the t-th update that
was applied to the parameters; p_t are the parameters right after it.

Power-function profile (sec. 3.1). The EMA at step t averages the trajectory with
the density over past time tau
  f_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),  0 < tau <= t,
whose standard deviation relative to t is (eq. 123)
  sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
It is tracked with the per-step decay beta_t = (1 - 1/t)^(gamma + 1) (eq. 127);
the tracked EMA gives p_s the weight (product of the decays, telescoped)
  w_s = (1 - beta_s) prod_{k=s+1..t} beta_k = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1),
which is exactly the integral of f_{t,gamma} over the step (s - 1, s].

Post-hoc reconstruction (sec. 3.2, appendix C, Algorithm 3). Snapshots i of
tracked EMAs, taken at steps t_i with exponents gamma_i, are combined as
sum_i w_i params_i with the w_i that minimise the L2 distance over the time
axis between sum_i w_i f_{t_i,gamma_i} and a target profile, subject to
sum_i w_i = 1 (so a constant trajectory is reproduced exactly).

Trainer protocol (what the trainer stores):
  gammas = [sigma_rel_to_gamma(s) for s in DEFAULT_SIGMA_RELS]  # once, on the host
  after applied update t:  emas[k] = update(emas[k], params, t, gammas[k])
  every N updates:         save emas[k] with Snapshot(step=t, gamma=gammas[k])
  at evaluation:           combine(saved params, posthoc_weights(snapshots, sigma_rel))
"""
from typing import Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from vdm_jax.typing import PyTree

DEFAULT_SIGMA_RELS: tuple[float, ...] = (0.05, 0.10)
# sigma_rel of gamma = 0, the uniform average of all steps; larger widths need gamma < 0.
MAX_SIGMA_REL = 12.0 ** -0.5


class Snapshot(NamedTuple):
  """What identifies a stored EMA snapshot; plain numbers, JSON-friendly.

  step: applied optimizer updates averaged into the snapshot (int >= 1).
  gamma: exponent of the power-function EMA it was copied from (float >= 0).
  """
  step: int
  gamma: float


def gamma_to_sigma_rel(gamma: float) -> float:
  """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2 eq. 123).

  Args:
    gamma: power-function exponent, float >= 0.

  Returns:
    relative standard deviation of the profile, in (0, MAX_SIGMA_REL].
  """
  gamma = _check_gamma(gamma)
  return float(np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma >= 0 whose profile has relative standard deviation sigma_rel.

  Inverts eq. 123 (EDM2 eq. 126, Algorithm 2): with s = sigma_rel^-2, gamma is the
  largest real root of
    (gamma + 2)^2 (gamma + 3) - s (gamma + 1)
      = gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0.
  Host-side numpy; call it once, outside jit.

  Args:
    sigma_rel: relative standard deviation, in (0, MAX_SIGMA_REL = 12^-1/2 ~ 0.2887].

  Returns:
    gamma (float >= 0); e.g. 0.05 -> 16.97, 0.10 -> 6.94.
  """
  sigma_rel = _check_sigma_rel(sigma_rel)
  s = sigma_rel ** -2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  return max(float(roots.real.max()), 0.0)


def power_weights(step: int, gamma: float) -> np.ndarray:
  """Weights w_s, s = 1..step, that the tracked EMA gives to p_s (float64).

    w_s = (1 - beta_s) prod_{k=s+1..t} beta_k = (s/t)^(gamma+1) - ((s-1)/t)^(gamma+1),
  with beta_k = (1 - 1/k)^(gamma + 1), t = step. They sum to 1.

  Args:
    step: t, the number of applied updates (int >= 1).
    gamma: power-function exponent (float >= 0).

  Returns:
    [step] float64 weights; entry s - 1 belongs to p_s.
  """
  step, gamma = _check_step(step), _check_gamma(gamma)
  s = np.arange(step + 1, dtype=np.float64) / step
  return np.diff(s ** (gamma + 1.0))


def update(ema: PyTree, params: PyTree, step: int | jax.Array, gamma: float | jax.Array) -> PyTree:
  """One power-function EMA step: ema <- beta_t ema + (1 - beta_t) params (EDM2 eq. 127).

  beta_t = (1 - 1/t)^(gamma + 1), computed as exp((gamma + 1) log1p(-1/t)) and
  1 - beta_t as -expm1(...), which keeps 1 - beta_t accurate in float32 for large t.
  beta_1 = 0, so the first update (t = 1) copies params exactly. jit-friendly:
  step and gamma may be traced.

  Args:
    ema: pytree of the EMA parameters (any value at t = 1, as long as finite).
    params: pytree of the same structure, the parameters p_t after update t.
    step: t, int >= 1: the count of applied optimizer updates including this one.
    gamma: power-function exponent >= 0 (from sigma_rel_to_gamma).

  Returns:
    the new EMA, same structure and dtypes as ema.
  """
  if isinstance(step, (int, np.integer)):  # a traced step cannot be checked here
    _check_step(step)
  if isinstance(gamma, (int, float, np.number)):
    _check_gamma(gamma)
  # log beta_t = (gamma + 1) log(1 - 1/t); -inf at t = 1.
  log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / jnp.asarray(step, jnp.float32))
  beta, one_minus_beta = jnp.exp(log_beta), -jnp.expm1(log_beta)
  return jax.tree.map(lambda e, p: (beta * e + one_minus_beta * p).astype(e.dtype), ema, params)


def posthoc_weights_sweep(snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], *,
                          step: Optional[int] = None) -> np.ndarray:
  """Least-squares snapshot weights for several target widths (an EMA-width sweep).

  For each target f* = f_{T, gamma*} (T = step, gamma* from sigma_rel), solves
    min_w || sum_i w_i f_{t_i, gamma_i} - f* ||_2^2  subject to  sum_i w_i = 1
  over the snapshots with t_i <= T, via the KKT system [[A, 1], [1^T, 0]] [w; mu] = [b; 1],
  A_ij = <f_i, f_j>, b_i = <f_i, f*>, with the closed-form inner products of _inner
  (EDM2 eq. 151, Algorithm 3; the sum-to-one constraint replaces the paper's
  rescaling after the solve). Snapshots after T get weight 0. float64 numpy.

  Args:
    snapshots: N (step, gamma) pairs in the order they were saved (steps non-decreasing).
    sigma_rels: M target widths, each in (0, MAX_SIGMA_REL].
    step: target step T; must be one of the snapshot steps. Default: the last one.

  Returns:
    [M, N] float64 weights; row m reconstructs sigma_rels[m] at step T.
  """
  steps, gammas = _check_snapshots(snapshots)
  target = _target_step(steps, step)
  target_gammas = np.array([sigma_rel_to_gamma(s) for s in sigma_rels], np.float64)
  if target_gammas.size == 0:
    raise ValueError("posthoc_weights_sweep needs at least one target sigma_rel, got none")
  used = steps <= target
  t, g = steps[used] / target, gammas[used]  # time in units of T keeps A of order 1
  n = t.size
  kkt = np.zeros((n + 1, n + 1))
  kkt[:n, :n] = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
  kkt[:n, n] = kkt[n, :n] = 1.0
  rhs = np.ones((n + 1, target_gammas.size))
  rhs[:n] = _inner(t[:, None], g[:, None], 1.0, target_gammas[None, :])
  try:
    solution = np.linalg.solve(kkt, rhs)
  except np.linalg.LinAlgError as e:
    raise ValueError(f"the {n} snapshot profiles up to step {target:g} are linearly dependent "
                     "(near-duplicate (step, gamma) pairs?)") from e
  weights = np.zeros((target_gammas.size, steps.size))
  weights[:, used] = solution[:n].T
  return weights


def posthoc_weights(snapshots: Sequence[Snapshot], sigma_rel: float, *,
                    step: Optional[int] = None) -> np.ndarray:
  """Weights w [N] such that sum_i w_i params_i is the post-hoc EMA of width sigma_rel.

  One row of posthoc_weights_sweep; see there for the least-squares problem.

  Args:
    snapshots: N (step, gamma) pairs in the order they were saved (steps non-decreasing).
    sigma_rel: target relative standard deviation, in (0, MAX_SIGMA_REL].
    step: target step; one of the snapshot steps. Default: the last one.

  Returns:
    [N] float64 weights summing to 1 (0 for snapshots after the target step).
  """
  return posthoc_weights_sweep(snapshots, [sigma_rel], step=step)[0]


def posthoc_fit_error(snapshots: Sequence[Snapshot], weights: npt.ArrayLike, sigma_rel: float, *,
                      step: Optional[int] = None) -> float:
  """Relative L2 error of the profile fit: ||sum_i w_i f_i - f*|| / ||f*||.

  ||R||^2 = w^T A w - 2 w^T b + <f*, f*> with the closed-form inner products.
  Bound on the reconstruction error: if sum_i w_i = 1, for each coordinate k
    |sum_i w_i params_i[k] - EMA*[k]| <= ||R|| * sqrt(sum_s (p_s[k] - m_k)^2)
  for any constant m_k (Cauchy-Schwarz, as the discrete weights are integrals of
  the profiles over each step), with ||f*|| = (gamma* + 1) / sqrt((2 gamma* + 1) T).
  Its resolution is limited by cancellation to about 1e-7 relative.

  Args:
    snapshots: N (step, gamma) pairs.
    weights: [N] snapshot weights.
    sigma_rel: target width.
    step: target step; default the last snapshot's.

  Returns:
    the relative residual, a float >= 0.
  """
  steps, gammas = _check_snapshots(snapshots)
  target = _target_step(steps, step)
  weights = np.asarray(weights, np.float64)
  if weights.shape != steps.shape:
    raise ValueError(f"weights must have shape {steps.shape} (one per snapshot), "
                     f"got {weights.shape}")
  gamma = sigma_rel_to_gamma(sigma_rel)
  t = steps / target
  gram = _inner(t[:, None], gammas[:, None], t[None, :], gammas[None, :])
  cross = _inner(t, gammas, 1.0, gamma)
  norm2 = _inner(1.0, gamma, 1.0, gamma)
  residual2 = weights @ gram @ weights - 2.0 * weights @ cross + norm2
  return float(np.sqrt(max(residual2, 0.0) / norm2))


def combine(snapshot_params: Iterable[PyTree], weights: npt.ArrayLike) -> PyTree:
  """sum_i w_i params_i, leaf by leaf, streaming over the snapshots.

  Accumulates in float32 (or wider) and returns each leaf in its input dtype.
  Snapshots with weight exactly 0 are skipped (their values may even be non-finite).

  Args:
    snapshot_params: iterable of N pytrees of one structure (e.g. loaded lazily).
    weights: [N] weights, e.g. from posthoc_weights.

  Returns:
    the combined pytree.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 1 or weights.size == 0:
    raise ValueError(f"weights must be a non-empty 1-D array, got shape {weights.shape}")
  total, dtypes, count = None, None, 0
  for params in snapshot_params:
    if count == weights.size:
      raise ValueError(f"got more snapshots than the {weights.size} weights")
    if total is None:
      dtypes = jax.tree.map(jnp.result_type, params)
      total = jax.tree.map(
          lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
          params)
    if weights[count] != 0.0:
      total = _add_scaled(total, float(weights[count]), params)
    count += 1
  if count != weights.size:
    raise ValueError(f"got {count} snapshots for {weights.size} weights")
  return jax.tree.map(lambda acc, dtype: acc.astype(dtype), total, dtypes)


def reconstruct(snapshots: Sequence[Snapshot], snapshot_params: Iterable[PyTree],
                sigma_rel: float, *, step: Optional[int] = None) -> PyTree:
  """The post-hoc EMA of width sigma_rel at step: combine(params, posthoc_weights(...)).

  Args:
    snapshots: N (step, gamma) pairs, in the order saved.
    snapshot_params: the N matching parameter pytrees (an iterable; may be lazy).
    sigma_rel: target width in (0, MAX_SIGMA_REL].
    step: target step (one of the snapshot steps); default the last.

  Returns:
    the reconstructed parameter pytree.
  """
  return combine(snapshot_params, posthoc_weights(snapshots, sigma_rel, step=step))


def _add_scaled(total: PyTree, w: float, params: PyTree) -> PyTree:
  """total + w * params, leaf by leaf (w a Python float: keeps total's dtype)."""
  return jax.tree.map(lambda acc, p: acc + w * p, total, params)


def _inner(t_a, gamma_a, t_b, gamma_b):
  """<f_{t_a,gamma_a}, f_{t_b,gamma_b}> = integral over tau of the product (EDM2 eq. 151).

  With lo = min(t_a, t_b), hi = max(t_a, t_b) and gamma_hi the exponent of the later one:
    int_0^lo (gamma_a+1)(gamma_b+1) tau^(gamma_a+gamma_b) / (t_a^(gamma_a+1) t_b^(gamma_b+1)) dtau
      = (gamma_a+1)(gamma_b+1) / ((gamma_a+gamma_b+1) hi) * (lo / hi)^gamma_hi.
  Broadcasts; units 1 / time.
  """
  lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
  gamma_hi = np.where(t_a < t_b, gamma_b, gamma_a)
  return ((gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * hi)
          * (lo / hi) ** gamma_hi)


def _check_sigma_rel(sigma_rel) -> float:
  if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
    raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (12^-1/2, the uniform "
                     f"average of all steps), got {sigma_rel}")
  return float(sigma_rel)


def _check_gamma(gamma) -> float:
  if not 0.0 <= gamma < np.inf:
    raise ValueError(f"the power-EMA exponent gamma must be finite and >= 0, got {gamma}")
  return float(gamma)


def _check_step(step) -> int:
  if not float(step).is_integer() or step < 1:
    raise ValueError(f"step must be an integer >= 1 (applied updates, counted from 1), got {step}")
  return int(step)


def _check_snapshots(snapshots) -> tuple[np.ndarray, np.ndarray]:
  """Validated (steps [N], gammas [N]) as float64 arrays."""
  if len(snapshots) == 0:
    raise ValueError("post-hoc EMA needs at least one snapshot, got none")
  pairs = [(_check_step(s), _check_gamma(g)) for s, g in snapshots]
  steps = [s for s, _ in pairs]
  for s0, s1 in zip(steps[:-1], steps[1:], strict=True):
    if s1 < s0:
      raise ValueError(f"snapshot steps must be non-decreasing in the order saved, "
                       f"got step {s1} after step {s0}")
  if len(set(pairs)) != len(pairs):
    raise ValueError("snapshots repeat a (step, gamma) pair; each profile must appear once")
  steps, gammas = np.array(pairs, np.float64).T
  return steps, gammas


def _target_step(steps: np.ndarray, step) -> float:
  if step is None:
    return float(steps[-1])
  if not np.any(steps == step):
    raise ValueError(f"target step {step} must be one of the snapshot steps "
                     f"({int(steps[0])} .. {int(steps[-1])}): the profile after the last "
                     "snapshot before it is not covered by the data")
  return float(step)
