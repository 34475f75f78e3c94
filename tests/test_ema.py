"""Tests of vdm_jax.ema: power-function EMA tracking and post-hoc reconstruction (EDM2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import ema

EPS32 = float(np.finfo(np.float32).eps)


def _track(trajectory, gammas):
  """Tracks one power EMA per gamma over p_1..p_T with a traced step.

  Args:
    trajectory: [T, D] float32, row t - 1 is p_t.
    gammas: K exponents.

  Returns:
    [T, K, D] float32: the K EMAs after each step t = 1..T.
  """
  gammas = jnp.asarray(gammas, jnp.float32)

  def body(emas, inputs):
    step, params = inputs
    emas = jax.vmap(lambda e, g: ema.update(e, params, step, g))(emas, gammas)
    return emas, emas

  num_steps, dim = trajectory.shape
  # Arbitrary finite start: the first update must overwrite it with p_1.
  start = jnp.full((gammas.size, dim), 123.0, jnp.float32)
  steps = jnp.arange(1, num_steps + 1, dtype=jnp.int32)
  return jax.jit(lambda p: jax.lax.scan(body, start, (steps, p))[1])(trajectory)


def _float32_tracking_bound(num_steps, gamma, scale):
  """Worst-case float32 error of a tracked power EMA after num_steps updates.

  Each update rounds beta, 1 - beta (exp/log1p/expm1, ~3 ulp each, and beta + (1 - beta) != 1
  by up to that), two products and a sum: at most c * eps * scale with c = 10. The error of
  step s is damped by prod_{k>s} beta_k = (s/T)^(gamma+1), and sum_s (s/T)^(gamma+1) <=
  T / (gamma + 2) + 1.
  """
  return 10 * EPS32 * (num_steps / (gamma + 2.0) + 1.0) * scale


def test_sigma_rel_and_gamma_invert_each_other_and_match_the_profile_std():
  # EDM2's default widths (0.05, 0.10) have gamma = 16.97 and 6.94 (roots of eq. 126).
  assert ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
  assert ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
  assert ema.sigma_rel_to_gamma(ema.MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)
  num_steps = 100_000
  midpoints = (np.arange(1, num_steps + 1) - 0.5) / num_steps
  for sigma_rel in [0.01, 0.05, 0.1, 0.2, 0.28]:
    gamma = ema.sigma_rel_to_gamma(sigma_rel)
    assert ema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # Eq. 123 checked against the weights themselves: the std of the discrete profile over
    # s / T (midpoint rule; its error is O(1 / T^2) = 1e-10 of the variance 4e-4 .. 0.08).
    w = ema.power_weights(num_steps, gamma)
    mean = w @ midpoints
    std = np.sqrt(w @ (midpoints - mean) ** 2)
    assert std == pytest.approx(sigma_rel, rel=1e-6)


def test_power_weights_are_the_product_of_the_per_step_decays():
  num_steps = 400
  for gamma in [0.0, 1.5, ema.sigma_rel_to_gamma(0.1), ema.sigma_rel_to_gamma(0.05)]:
    t = np.arange(1, num_steps + 1, dtype=np.float64)
    beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
    # w_s = (1 - beta_s) prod_{k=s+1..T} beta_k, as a reversed cumulative product.
    later = np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0)
    expected = (1.0 - beta) * later
    np.testing.assert_allclose(ema.power_weights(num_steps, gamma), expected,
                               rtol=1e-10, atol=1e-300)
    assert ema.power_weights(num_steps, gamma).sum() == pytest.approx(1.0, abs=1e-12)


def test_tracked_power_ema_equals_the_closed_form_weighted_sum():
  rng = np.random.default_rng(1)
  num_steps, dim = 500, 16
  # White noise around a slow trend: any off-by-one in the step shifts the result by ~1e-3.
  t = np.arange(1, num_steps + 1)[:, None]
  trajectory = (np.sin(t / 60.0 + rng.uniform(0, 6, dim)) + rng.normal(size=(num_steps, dim)))
  trajectory = trajectory.astype(np.float32)
  gammas = [0.0, 1.5, ema.sigma_rel_to_gamma(0.10), ema.sigma_rel_to_gamma(0.05)]
  tracked = np.asarray(_track(trajectory, gammas))
  np.testing.assert_array_equal(tracked[0], np.broadcast_to(trajectory[0], tracked[0].shape))
  scale = np.abs(trajectory).max()
  for k, gamma in enumerate(gammas):
    for step in [2, 37, num_steps]:
      expected = ema.power_weights(step, gamma) @ trajectory[:step].astype(np.float64)
      tol = _float32_tracking_bound(step, gamma, scale)
      np.testing.assert_allclose(tracked[step - 1, k], expected, rtol=0, atol=tol)
  # Python-int steps outside jit take the same path.
  e = {"w": jnp.zeros(dim)}
  for step in range(1, 31):
    e = ema.update(e, {"w": trajectory[step - 1]}, step, gammas[2])
  np.testing.assert_allclose(e["w"], tracked[29, 2], rtol=0,
                             atol=_float32_tracking_bound(30, 0, scale))


def _snapshots(tracked, gammas, every):
  """(Snapshot list, params list) of EMAs k at steps every, 2 every, ... from _track output."""
  infos, params = [], []
  for step in range(every, tracked.shape[0] + 1, every):
    for k, gamma in enumerate(gammas):
      infos.append(ema.Snapshot(step, gamma))
      params.append({"w": tracked[step - 1, k]})
  return infos, params


def _discrete_residual(snapshots, weights, gamma, num_steps):
  """d_s = sum_i w_i (weights of snapshot i on p_s) - (target weights on p_s), s = 1..T, float64."""
  d = -ema.power_weights(num_steps, gamma)
  for (step, g), w in zip(snapshots, weights, strict=True):
    d[:step] += w * ema.power_weights(step, g)
  return d


def test_posthoc_reconstruction_matches_a_directly_tracked_third_profile():
  rng = np.random.default_rng(2)
  num_steps, every, dim = 2000, 100, 32
  # A cubic in t / T per coordinate plus per-step noise.
  x = np.arange(1, num_steps + 1)[:, None] / num_steps
  coefs = rng.normal(size=(4, dim))
  trajectory = (coefs[0] + coefs[1] * x + coefs[2] * x ** 2 + coefs[3] * x ** 3
                + 0.1 * rng.normal(size=(num_steps, dim))).astype(np.float32)
  tracked_gammas = [ema.sigma_rel_to_gamma(s) for s in ema.DEFAULT_SIGMA_RELS]
  target_sigma_rel = 0.07
  gamma = ema.sigma_rel_to_gamma(target_sigma_rel)
  tracked = np.asarray(_track(trajectory, tracked_gammas + [gamma]))
  direct = tracked[-1, 2].astype(np.float64)
  snapshots, snapshot_params = _snapshots(tracked, tracked_gammas, every)

  weights = ema.posthoc_weights(snapshots, target_sigma_rel)
  recon = np.asarray(ema.combine(snapshot_params, weights)["w"], np.float64)
  fit = ema.posthoc_fit_error(snapshots, weights, target_sigma_rel)
  assert abs(weights.sum() - 1.0) < 1e-9
  assert fit < 0.01  # two widths every T/20 steps fit sigma_rel = 0.07 to ~0.25%

  # The closed-form residual ||R|| (from the Gram matrix) against the discrete one: the
  # discrete weights are integrals of the profiles over unit steps, so ||d|| <= ||R||
  # (Jensen); the gap is O(1 / profile width^2) ~ 1e-4 of ||R||^2 here.
  target_norm = (gamma + 1.0) / np.sqrt((2.0 * gamma + 1.0) * num_steps)  # ||f*||
  d = _discrete_residual(snapshots, weights, gamma, num_steps)
  assert np.linalg.norm(d) <= fit * target_norm * (1 + 1e-6)
  assert np.linalg.norm(d) >= 0.99 * fit * target_norm

  # Float32 tolerance: tracking error of each EMA combined with |w|_1, plus the sum's rounding.
  scale = np.abs(trajectory).max()
  w_l1 = np.abs(weights).sum()
  tracking = _float32_tracking_bound(num_steps, min(tracked_gammas + [gamma]), scale)
  float_tol = (1.0 + w_l1) * tracking + len(weights) * EPS32 * w_l1 * scale
  # Exactly, recon - direct = sum_s d_s p_s (up to float32).
  np.testing.assert_allclose(recon - direct, d @ trajectory.astype(np.float64),
                             rtol=0, atol=float_tol)
  # Stated bound: sum_s d_s = 0, so
  #   |recon - direct| <= ||d|| ||p - mean(p)|| <= ||R|| ||p - mean(p)||  (per coordinate).
  spread = np.linalg.norm(trajectory - trajectory.mean(0), axis=0)
  bound = fit * target_norm * spread + abs(weights.sum() - 1.0) * scale + float_tol
  assert np.all(np.abs(recon - direct) <= bound), (np.abs(recon - direct) / bound).max()
  # The bound is tight enough to tell sigma_rel = 0.07 from the tracked 0.05 and 0.10.
  for k in range(2):
    assert np.any(np.abs(tracked[-1, k] - direct) > 3 * bound)


def test_reconstruction_is_exact_for_a_tracked_profile_at_a_snapshot_step():
  rng = np.random.default_rng(3)
  num_steps, every, dim = 600, 50, 8
  trajectory = np.cumsum(rng.normal(size=(num_steps, dim)), axis=0).astype(np.float32)
  tracked_gammas = [ema.sigma_rel_to_gamma(s) for s in ema.DEFAULT_SIGMA_RELS]
  tracked = np.asarray(_track(trajectory, tracked_gammas))
  snapshots, snapshot_params = _snapshots(tracked, tracked_gammas, every)
  scale = np.abs(trajectory).max()
  for step, k in [(num_steps, 1), (300, 0), (300, 1), (50, 0)]:
    sigma_rel = ema.DEFAULT_SIGMA_RELS[k]
    weights = ema.posthoc_weights(snapshots, sigma_rel, step=step)
    j = snapshots.index((step, tracked_gammas[k]))
    np.testing.assert_allclose(weights, np.eye(len(snapshots))[j], rtol=0, atol=1e-9)
    assert ema.posthoc_fit_error(snapshots, weights, sigma_rel, step=step) < 1e-6
    recon = ema.reconstruct(snapshots, snapshot_params, sigma_rel, step=step)["w"]
    # One-hot up to 1e-9 per weight: the other snapshots add at most 1e-9 N scale.
    tol = 1e-9 * len(snapshots) * scale + EPS32 * scale
    np.testing.assert_allclose(recon, tracked[step - 1, k], rtol=0, atol=tol)


def test_constant_trajectory_is_reconstructed_exactly_and_weights_sum_to_one():
  rng = np.random.default_rng(4)
  gammas = [ema.sigma_rel_to_gamma(s) for s in ema.DEFAULT_SIGMA_RELS]
  snapshots = [ema.Snapshot(step, g) for step in range(64, 1025, 64) for g in gammas]
  constant = {"a": rng.normal(size=(3, 4)).astype(np.float32),
              "b": {"c": np.float32(rng.normal())}}
  scale = max(np.abs(constant["a"]).max(), abs(constant["b"]["c"]))
  sigma_rels = [0.02, 0.07, 0.15, 0.25]
  for step in [1024, 512]:
    sweep = ema.posthoc_weights_sweep(snapshots, sigma_rels, step=step)
    assert sweep.shape == (len(sigma_rels), len(snapshots))
    for sigma_rel, weights in zip(sigma_rels, sweep, strict=True):
      single = ema.posthoc_weights(snapshots, sigma_rel, step=step)
      np.testing.assert_allclose(weights, single, rtol=0, atol=1e-12)
      assert abs(weights.sum() - 1.0) < 1e-9
      assert np.all(weights[[s > step for s, _ in snapshots]] == 0.0)
      recon = ema.combine([constant] * len(snapshots), weights)
      # Each of the N float32 additions rounds by <= eps * |w|_1 * scale.
      tol = (len(snapshots) * EPS32 * np.abs(weights).sum() + abs(weights.sum() - 1.0)) * scale
      assert recon["a"].dtype == jnp.float32 and recon["b"]["c"].dtype == jnp.float32
      np.testing.assert_allclose(recon["a"], constant["a"], rtol=0, atol=tol)
      np.testing.assert_allclose(recon["b"]["c"], constant["b"]["c"], rtol=0, atol=tol)


def test_combine_skips_zero_weights_and_keeps_dtypes():
  params = [{"w": np.full(3, v, np.float32)} for v in [1.0, 2.0, np.nan]]
  out = ema.combine(iter(params), [0.25, 0.75, 0.0])
  np.testing.assert_allclose(out["w"], 1.75, rtol=1e-7)
  assert out["w"].dtype == jnp.float32


GOOD = [ema.Snapshot(10, 6.9), ema.Snapshot(10, 17.0),
        ema.Snapshot(20, 6.9), ema.Snapshot(20, 17.0)]


@pytest.mark.parametrize("call, match", [
    (lambda: ema.sigma_rel_to_gamma(0.0), "sigma_rel must be in"),
    (lambda: ema.sigma_rel_to_gamma(0.3), "sigma_rel must be in"),
    (lambda: ema.sigma_rel_to_gamma(float("nan")), "sigma_rel must be in"),
    (lambda: ema.gamma_to_sigma_rel(-0.5), "gamma must be finite and >= 0"),
    (lambda: ema.power_weights(0, 1.0), "step must be an integer >= 1"),
    (lambda: ema.update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0, 1.0),
     "step must be an integer >= 1"),
    (lambda: ema.posthoc_weights([], 0.1), "at least one snapshot"),
    (lambda: ema.posthoc_weights(GOOD[2:] + GOOD[:2], 0.1), "non-decreasing"),
    (lambda: ema.posthoc_weights(GOOD + GOOD[-1:], 0.1), "repeat"),
    (lambda: ema.posthoc_weights(GOOD + [ema.Snapshot(30.5, 6.9)], 0.1),
     "step must be an integer"),
    (lambda: ema.posthoc_weights(GOOD, 0.1, step=15), "must be one of the snapshot steps"),
    (lambda: ema.posthoc_weights(GOOD, 0.5), "sigma_rel must be in"),
    (lambda: ema.posthoc_weights_sweep(GOOD, []), "at least one target"),
    (lambda: ema.posthoc_fit_error(GOOD, [1.0], 0.1), "one per snapshot"),
    (lambda: ema.combine([{"w": 1.0}] * 2, [0.5, 0.25, 0.25]),
     "got 2 snapshots for 3 weights"),
    (lambda: ema.combine([{"w": 1.0}] * 3, [0.5, 0.5]), "more snapshots than the 2 weights"),
    (lambda: ema.combine([], []), "non-empty 1-D"),
])
def test_bad_inputs_raise_value_error_with_a_clear_message(call, match):
  with pytest.raises(ValueError, match=match):
    call()
