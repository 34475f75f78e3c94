"""Post-hoc EMA (Karras et al. 2024) in the trainer: power EMAs, snapshots, the eval sweep.

The power EMAs are checked against the closed form sum_s w_s p_s (vdm_jax.ema.power_weights)
over the params the train step produced, in float64; snapshots against a resumed run and
against the checkpoints' states; the reconstruction at a tracked width against its snapshot.
"""
import jax
import numpy as np
import pytest

from vdm_jax import ema
from vdm_jax import train
from vdm_jax.train import checkpoints
from vdm_jax.train import data
from vdm_jax.train import ema_snapshots
from vdm_jax.train import inference
from vdm_jax.train import step as step_lib
from train_helpers import NAN_LOSS
from train_helpers import PoisonedModel
from train_helpers import tiny_config
from train_helpers import train_until_preempted_at_batch

EPS32 = float(np.finfo(np.float32).eps)
SNAPSHOT_EVERY = 3  # train steps 3, 6, ..., 18 and the last, 20; checkpoints every 5


def _config():
  config = tiny_config(num_steps=20)
  config.training.ema_snapshot_every = SNAPSHOT_EVERY
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted 20-step run with snapshots every 3 updates: (config, workdir)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = _config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _batches(count, seed=0):
  iterator = data.train_iterator(data.load_digits("train"), batch_size=8, seed=seed,
                                 num_threads=0)
  return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(count)]


def _assert_power_emas_match(power_emas, applied_params, gammas):
  """power_emas[k] = sum_s w_s(t, gamma_k) p_s, s = 1..t (t = len(applied_params)), float64.

  float32 tolerance of the tracked recurrence (as in tests/test_ema.py): each update rounds
  beta, 1 - beta, two products and a sum (<= 10 eps of the leaf's scale); the error of step s
  is damped by (s/t)^(gamma+1), whose sum is <= t / (gamma + 2) + 1.
  """
  t = len(applied_params)
  scale = max(np.abs(p).max() for p in jax.tree.leaves(applied_params))
  stacked = jax.tree.map(lambda *ps: np.stack(ps), *applied_params)  # leaves [t, ...]
  for tracked, gamma in zip(power_emas, gammas, strict=True):
    weights = ema.power_weights(t, gamma)
    expected = jax.tree.map(lambda p, w=weights: np.tensordot(w, p, axes=1), stacked)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_host(tracked)),
                            jax.tree.leaves(expected), strict=True):
      tol = 10 * EPS32 * (t / (gamma + 2.0) + 1.0) * scale
      np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=jax.tree_util.keystr(path))


def test_power_emas_are_the_power_weighted_sums_of_the_params_the_trainer_produced():
  setup = train.get_setup(tiny_config())
  gammas = [ema.sigma_rel_to_gamma(s) for s in setup.config.optimizer.power_ema_sigma_rels]
  np.testing.assert_allclose(gammas, [16.97, 6.94], atol=5e-3)  # EDM2's 0.05 and 0.10
  state, params = setup.init_state(), []
  for batch in _batches(6):
    state, _ = setup.train_step(state, setup.global_batch(batch))
    params.append(_host(state.params))
  assert int(step_lib.update_count(state.opt_state)) == 6
  # The params moved (warm-up ends at step 2), so an off-by-one in t would show: gamma ~ 17
  # puts 96% of the weight on the last step.
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params[-1]),
                                                  jax.tree.leaves(params[-2]), strict=True))
  assert moved > 1e-4
  _assert_power_emas_match(state.power_emas, params, gammas)


def test_skipped_nonfinite_steps_and_accumulating_micro_batches_leave_the_power_emas():
  """accumulation_steps=2 over b0, b1 | b2, NaN, b3 | b4, b5: the power EMAs stay bitwise
  after a micro-batch that does not complete a window and after the NaN step, and end as
  the closed form over the 3 applied updates with t = 1, 2, 3."""
  config = tiny_config()
  config.optimizer.accumulation_steps = 2
  config.optimizer.warmup_steps = 0  # the first update moves the params (and the EMAs)
  setup = train.Setup(config)
  setup.model = PoisonedModel(setup.model)
  batches = _batches(6, seed=3)
  poisoned = {k: v.copy() for k, v in batches[0].items()}
  poisoned["image"][0, 0, 0, 0] = NAN_LOSS
  sequence = batches[:3] + [poisoned] + batches[3:]
  state = setup.init_state()
  before, applied = _host(state.power_emas), []
  for n, batch in enumerate(sequence):
    state, metrics = setup.train_step(state, setup.global_batch(batch))
    now, count = _host(state.power_emas), int(step_lib.update_count(state.opt_state))
    assert float(metrics["nonfinite"]) == (n == 3)
    if n in (1, 4, 6):  # a window completes
      applied.append(_host(state.params))
      assert count == len(applied)
      assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(now),
                                                          jax.tree.leaves(before), strict=True))
    else:
      assert count == len(applied)
      for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    before = now
  gammas = [ema.sigma_rel_to_gamma(s) for s in config.optimizer.power_ema_sigma_rels]
  _assert_power_emas_match(state.power_emas, applied, gammas)


def _store_contents(workdir, abstract_params):
  store = ema_snapshots.make_store(workdir, create=False)
  try:
    metas = ema_snapshots.read_index(store)
    arrays = {m["step"]: _host(ema_snapshots.load(store, m["step"], abstract_params,
                                                  len(m["gammas"]))) for m in metas}
  finally:
    store.close()
  return metas, arrays


def test_snapshots_of_an_interrupted_and_resumed_run_are_bitwise_the_uninterrupted_ones(
    trained, tmp_path, monkeypatch):
  config, workdir = trained
  # The loop reads 2 ahead: at batch 14, steps 1..13 are done and snapshot 12 is written.
  train_until_preempted_at_batch(monkeypatch, config, tmp_path, 14)
  abstract = train.get_setup(config).abstract_state().params
  metas, _ = _store_contents(str(tmp_path), abstract)
  assert [m["step"] for m in metas] == [3, 6, 9, 12]  # the resume (from 10) passes 12 again
  train.train_and_evaluate(config, str(tmp_path))
  metas, arrays = _store_contents(str(tmp_path), abstract)
  expected_metas, expected_arrays = _store_contents(workdir, abstract)
  assert [m["step"] for m in metas] == [3, 6, 9, 12, 15, 18, 20]
  assert metas == expected_metas
  gammas = [ema.sigma_rel_to_gamma(s) for s in config.optimizer.power_ema_sigma_rels]
  assert all(m["gammas"] == gammas and m["train_step"] == m["step"] for m in metas)
  for step, emas in expected_arrays.items():
    assert jax.tree.structure(arrays[step]) == jax.tree.structure(emas)
    for a, b in zip(jax.tree.leaves(arrays[step]), jax.tree.leaves(emas), strict=True):
      np.testing.assert_array_equal(a, b)


def test_snapshots_hold_the_checkpointed_power_emas_and_a_tracked_width_reconstructs_its_own(
    trained):
  config, workdir = trained
  setup = train.get_setup(config)
  abstract = setup.abstract_state().params
  metas, arrays = _store_contents(workdir, abstract)
  manager = checkpoints.make_manager(f"{workdir}/checkpoints")
  for step in (15, 20):  # checkpoints and snapshots at the same step hold the same EMAs
    _, state, _ = checkpoints.restore(manager, setup.abstract_state(), step=step)
    for a, b in zip(jax.tree.leaves(_host(state.power_emas)), jax.tree.leaves(arrays[step]),
                    strict=True):
      np.testing.assert_array_equal(a, b)
  manager.close()
  snapshots = [ema.Snapshot(m["step"], g) for m in metas for g in m["gammas"]]
  for step in (9, 20):
    for k, sigma_rel in enumerate(config.optimizer.power_ema_sigma_rels):
      params = _host(inference.posthoc_ema_params(config, workdir, sigma_rel, step=step))
      # The fitted weights are one-hot up to the solve's rounding; the sum adds float32
      # rounding of each weighted term.
      weights = ema.posthoc_weights(snapshots, sigma_rel, step=step)
      one_hot = np.array([s == (step, metas[0]["gammas"][k]) for s in snapshots], float)
      assert np.abs(weights - one_hot).sum() < 1e-6
      scale = max(np.abs(x).max() for x in jax.tree.leaves(arrays))
      tol = (np.abs(weights - one_hot).sum() + 2 * EPS32 * np.abs(weights).sum()) * scale
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(arrays[step][k]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)
  with pytest.raises(train.CheckpointError, match="must be a snapshot step"):
    inference.posthoc_ema_params(config, workdir, 0.07, step=10)


def test_eval_mode_reports_one_bits_per_dim_per_width_and_the_best(trained, caplog):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.posthoc_sigma_rels = (0.03, 0.05, 0.08, 0.15)
  with caplog.at_level("INFO"):
    result = train.evaluate(config, workdir)
  posthoc = result["posthoc"]
  assert posthoc["snapshot_step"] == 20 and posthoc["num_snapshots"] == 7 * 2
  assert [w["sigma_rel"] for w in posthoc["widths"]] == [0.03, 0.05, 0.08, 0.15]
  bpds = [w["bpd"] for w in posthoc["widths"]]
  assert all(np.isfinite(bpds)) and all(w["bpd_stderr"] > 0 for w in posthoc["widths"])
  assert len(set(bpds)) == 4  # four different parameter sets
  assert posthoc["best_bpd"] == min(bpds)
  assert posthoc["best_sigma_rel"] == posthoc["widths"][int(np.argmin(bpds))]["sigma_rel"]
  assert posthoc["ema_bpd"] == result["bpd"]  # the classic EMA, for comparison
  fits = {w["sigma_rel"]: w["fit_error"] for w in posthoc["widths"]}
  assert fits[0.05] < 1e-6 < fits[0.03] < 0.5  # a tracked width is fitted exactly
  assert "post-hoc EMA at update 20 from 14 snapshot profiles" in caplog.text
  assert "best: sigma_rel" in caplog.text and "classic EMA" in caplog.text


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.power_ema_sigma_rels", (0.05, 0.5), r"optimizer.power_ema_sigma_rels has 0.5, "
     r"outside \(0, 0.2887\]"),
    ("optimizer.power_ema_sigma_rels", (0.1, 0.1), "repeats a width"),
    ("training.ema_snapshot_every", -1, "training.ema_snapshot_every must be an integer >= 0"),
    ("eval.posthoc_sigma_rels", (0.0,), r"eval.posthoc_sigma_rels has 0.0, outside"),
])
def test_bad_power_ema_fields_fail_with_a_one_line_error(tmp_path, field, value, message):
  config = tiny_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(train.ConfigError, match=message) as info:
    train.validate_config(config, str(tmp_path))
  assert "\n" not in str(info.value)


def test_posthoc_eval_without_power_emas_names_the_fix(tmp_path):
  config = tiny_config()
  config.optimizer.power_ema_sigma_rels = ()
  train.validate_config(config, str(tmp_path))  # disabled power EMAs are a valid config
  assert train.Setup(config).init_state().power_emas == ()
  config.eval.posthoc_sigma_rels = (0.1,)
  with pytest.raises(train.ConfigError, match="needs power-EMA snapshots.*power_ema_sigma_rels"):
    train.validate_config(config, str(tmp_path))
