"""Tests of the trainer: optimizer pieces, resume, eval/sample modes and fast failures."""
import collections
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import digits_cond
from vdm_jax import decoders
from vdm_jax import sampling
from vdm_jax.train import checkpoints
from vdm_jax.train import config as config_lib
from vdm_jax.train import data
from vdm_jax.train import loop
from vdm_jax.train import setup as setup_lib
from vdm_jax import train
from vdm_jax.train import step as step_lib
from train_helpers import NOISE_PROOF_ADAM_EPS
from train_helpers import tiny_config
from train_helpers import train_until_preempted_at_batch


def _final_state(config, workdir):
  setup = train.get_setup(config)
  manager = checkpoints.make_manager(os.path.join(workdir, "checkpoints"))
  step, state, position = checkpoints.restore(manager, setup.abstract_state())
  manager.close()
  return step, state, position


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted 20-step run (checkpoints every 5), its workdir and eval metrics."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = tiny_config()
  config.training.tensorboard = True  # the events file is checked below
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_weight_decay_mask_skips_biases_norm_scales_gamma_and_the_grid_prior():
  params = {"score_model": {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
                            "norm": {"scale": jnp.ones(2)}},
            "gamma": {"l2": {"kernel": jnp.ones((1, 4))}, "w": jnp.ones(1)},
            "grid_prior": jnp.zeros((8, 8, 1, 17))}
  mask = step_lib.weight_decay_mask(params)
  assert mask["score_model"]["conv"] == {"kernel": True, "bias": False}
  assert mask["score_model"]["norm"]["scale"] is False
  assert mask["gamma"] == {"l2": {"kernel": False}, "w": False}
  assert mask["grid_prior"] is False


def test_learning_rate_warms_up_linearly_then_cosine_or_linearly_decays_to_zero():
  lr = step_lib.learning_rate_schedule(learning_rate=2e-3, warmup_steps=10, decay="cosine",
                                          decay_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 1e-3, 2e-3], rtol=1e-6)
  np.testing.assert_allclose(lr(60), 1e-3, rtol=1e-5)  # half way through the cosine
  np.testing.assert_allclose(lr(110), 0.0, atol=1e-9)
  linear = step_lib.learning_rate_schedule(learning_rate=2e-3, warmup_steps=10, decay="linear",
                                           decay_steps=110)
  np.testing.assert_allclose([linear(5), linear(10), linear(35), linear(60), linear(110)],
                             [1e-3, 2e-3, 1.5e-3, 1e-3, 0.0], rtol=1e-5, atol=1e-9)
  constant = step_lib.learning_rate_schedule(learning_rate=1e-3, warmup_steps=4)
  np.testing.assert_allclose([constant(2), constant(1000)], [5e-4, 1e-3], rtol=1e-6)


def test_gradient_accumulation_equals_one_update_with_the_mean_gradient():
  rng = np.random.default_rng(1660)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  g1, g2 = ({"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)} for _ in range(2))
  kwargs = dict(schedule=optax.constant_schedule(0.1), b1=0.9, b2=0.99, eps=1e-8,
                weight_decay=0.01, grad_clip_norm=0.0)
  acc = step_lib.make_optimizer(accumulation_steps=2, **kwargs)
  state = acc.init(params)
  u1, state = acc.update(g1, state, params)
  np.testing.assert_array_equal(u1["w"], 0.0)
  u2, _ = acc.update(g2, state, params)
  plain = step_lib.make_optimizer(**kwargs)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = plain.update(mean, plain.init(params), params)
  np.testing.assert_allclose(u2["w"], expected["w"], rtol=1e-6)


def _adam_updates(grads, *, lr, b1, b2, eps, clip):
  """Adam (Kingma & Ba 2015, Alg. 1) on globally clipped gradients, float64:
  g <- g min(1, clip / ||g||); m, v moments; update = -lr m_hat / (sqrt(v_hat) + eps)."""
  m = v = 0.0
  updates = []
  for n, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if clip > 0:
      g = g * min(1.0, clip / np.linalg.norm(g))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + eps))
  return updates


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_global_norm_clipping_rescales_a_large_gradient_before_adam(clip):
  """A gradient of norm ~40 then one of norm 0.5 under a limit of 1: clipping shrinks the
  first 40x, which changes Adam's second update (its moments mix both gradients) by far more
  than float32 noise; the second gradient is below the limit and passes unchanged."""
  rng = np.random.default_rng(1601)
  g1 = rng.normal(size=(2, 3)) * 16.0
  g2 = rng.normal(size=(2, 3))
  g2 *= 0.5 / np.linalg.norm(g2)
  hyper = dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-8)
  tx = step_lib.make_optimizer(schedule=optax.constant_schedule(hyper["lr"]), b1=hyper["b1"],
                               b2=hyper["b2"], eps=hyper["eps"], weight_decay=0.0,
                               grad_clip_norm=clip)
  params = {"w": jnp.zeros((2, 3))}
  state = tx.init(params)
  got = []
  for g in (g1, g2):
    update, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    got.append(np.asarray(update["w"]))
  expected = _adam_updates([g1.astype(np.float32), g2.astype(np.float32)], clip=clip, **hyper)
  assert np.linalg.norm(g1) > 10 * max(clip, 1.0)
  # float32: moments and square roots of a few ops each, ~1e-6 relative.
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)


def test_ema_update_is_the_convex_combination():
  rng = np.random.default_rng(1661)
  ema, params = rng.normal(size=5), rng.normal(size=5)
  np.testing.assert_allclose(step_lib.ema_update(ema, params, 0.9), 0.9 * ema + 0.1 * params)


def test_train_step_reports_the_bound_at_its_documented_key_and_moves_params_after_warmup():
  setup = train.get_setup(tiny_config())
  state = setup.init_state()
  before = jax.device_get(state)  # a host copy: the step donates its input
  batch = next(data.train_iterator(data.load_digits("train"), batch_size=8, seed=0))
  # Step i draws its randomness from fold_in(state.rng, i): the bound of that key, computed
  # outside the step, is what the step reports (the terms each on their own).
  loss, terms = jax.jit(lambda p, x, k: setup.model.loss(p, x, k, train=True))(
      before.params, jnp.asarray(batch["image"]), jax.random.fold_in(before.rng, 0))
  state, metrics = setup.train_step(state, setup.global_batch(batch))
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1
  to_bpd = 1.0 / (setup.model.num_dims * np.log(2))
  expected = {"bpd": loss, **{f"bpd_{k}": terms[k] for k in ("prior", "reconstruction",
                                                                "diffusion")}}
  for name, value in expected.items():  # float32, fused differently with the gradient
    np.testing.assert_allclose(metrics[name], np.mean(value) * to_bpd, rtol=1e-5, err_msg=name)
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  assert metrics["gamma_0"] < metrics["gamma_1"]
  np.testing.assert_allclose(metrics["learning_rate"], 0.0)  # warm-up starts at 0
  assert jax.tree.structure(before.params) == jax.tree.structure(state.params)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                       jax.tree.leaves(state.params), strict=True)]
  assert not any(changed)  # lr 0 at step 0: AdamW leaves params as they were
  state, _ = setup.train_step(state, setup.global_batch(batch))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                       jax.tree.leaves(state.params), strict=True))


def test_the_two_compiled_programs_equal_the_fused_train_step():
  # Setup runs make_gradient_step and make_update_step as two programs; make_train_step
  # is their composition as one function. Three steps (the first has lr 0) from one state.
  config = tiny_config()
  config.optimizer.eps = NOISE_PROOF_ADAM_EPS
  setup = train.get_setup(config)
  o = setup.config.optimizer
  fused = jax.jit(step_lib.make_train_step(
      setup.model, setup.tx, setup.schedule, ema_decay=o.ema_decay,
      accumulation_steps=o.accumulation_steps,
      power_ema_gammas=config_lib.power_ema_gammas(setup.config)))
  two_programs, flops = setup.compiled_train_step()
  assert flops is not None and flops > 0
  batches = data.train_iterator(data.load_digits("train"), batch_size=8, seed=0)
  state_a = setup.init_state()
  state_b = jax.tree.map(jnp.copy, state_a)
  for _ in range(3):
    batch = setup.global_batch(next(batches))
    state_a, metrics_a = two_programs(state_a, batch)
    state_b, metrics_b = fused(state_b, batch)
  assert int(state_a.step) == int(state_b.step) == 3
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  assert metrics_a.keys() == metrics_b.keys()
  # The same float32 operations, fused differently across the programs' boundary:
  # agreement to a few float32 ulps of each value, relative (eps = 2^-23).
  tolerance = dict(rtol=64 * np.finfo(np.float32).eps, atol=1e-7)
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tolerance)
  for name in metrics_a:
    np.testing.assert_allclose(metrics_a[name], metrics_b[name], **tolerance, err_msg=name)


def test_training_writes_checkpoints_events_samples_and_gamma_plot(trained):
  _, workdir, metrics = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "15", "20", "5"]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  (png,) = glob.glob(os.path.join(workdir, "samples", "step_00000020_*.png"))
  assert Image.open(png).size[0] >= 256
  assert os.path.isfile(os.path.join(workdir, "plots", "gamma_00000020.png"))
  assert metrics["num_examples"] == 24 and np.isfinite(metrics["bpd"])


def _garble(folder):
  for root, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")


@pytest.mark.parametrize("damaged", [False, True], ids=["newest_intact", "newest_damaged"])
def test_resume_after_interruption_gives_bitwise_the_uninterrupted_params(
    trained, tmp_path, monkeypatch, caplog, damaged):
  """Preempted after 12 batches (checkpoints 5 and 10 written), then resumed: from 10, or,
  with 10's files garbled, from 5 after a warning; either way steps 1..20 end bitwise as the
  uninterrupted run ends (the damaged step 10 is not saved again, 15 and 20 are)."""
  config, workdir, expected_metrics = trained
  train_until_preempted_at_batch(monkeypatch, config, tmp_path, 12)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]
  if damaged:
    _garble(tmp_path / "checkpoints" / "10")
  with caplog.at_level("INFO"):
    metrics = train.train_and_evaluate(config, str(tmp_path))
  assert ("checkpoint 10" in caplog.text and "falling back" in caplog.text) == damaged
  assert f"resumed from checkpoint {5 if damaged else 10}" in caplog.text
  step, resumed, position = _final_state(config, str(tmp_path))
  _, uninterrupted, expected_position = _final_state(config, workdir)
  assert step == 20 and position == expected_position
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert metrics == expected_metrics


def test_a_stop_request_ends_training_after_its_step_and_the_resumed_run_ends_bitwise(
    trained, tmp_path):
  """main.py's SIGTERM handler calls train.request_stop besides raising SystemExit (which
  Python can lose inside a callback): asked at the step-5 log line, the loop finishes step
  5's checkpoint, raises SystemExit(143) and releases the lock; the next run resumes from
  5 (the request was served) and ends as the uninterrupted run ends."""
  config, workdir, expected_metrics = trained
  stop_at_5 = lambda step, scalars: train.request_stop(143) if step == 5 else None
  with pytest.raises(SystemExit) as stopped:
    train.train_and_evaluate(config, str(tmp_path), on_metrics=stop_at_5)
  assert stopped.value.code == 143
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
  assert not (tmp_path / "LOCK").exists()
  assert train.train_and_evaluate(config, str(tmp_path)) == expected_metrics
  step, resumed, _ = _final_state(config, str(tmp_path))
  _, uninterrupted, _ = _final_state(config, workdir)
  assert step == 20
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_mode_reproduces_the_last_training_evaluation(trained):
  config, workdir, metrics = trained
  result = train.evaluate(config, workdir)
  assert result.pop("step") == 20 and result.pop("seconds") > 0
  assert result == metrics


def test_sample_mode_writes_images_and_reverse_process_gif(trained):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.sample.gif = True
  config.sample.sampler = "ddim"
  config.sample.checkpoint_step = 15
  paths = train.sample(config, workdir)
  images = np.load(paths["npy"])
  assert images.shape == (4, 8, 8, 1) and images.min() >= 0 and images.max() < 17
  assert "step_00000015_ddim6" in paths["png"] and Image.open(paths["png"]).size[0] >= 256
  gif = Image.open(paths["gif"])
  assert gif.n_frames == 4  # 3 progressive predictions + the final samples


def test_conditional_sampling_applies_classifier_free_guidance_to_the_chosen_label(tmp_path):
  """configs/digits_cond through train.sample: the images are ancestral samples of
  (1 + w) eps(z, c) - w eps(z, null) (Ho & Salimans 2021, eq. 6), c = sample.label, from the
  checkpoint's EMA params, decoded with the key PRNGKey(sample.seed)."""
  config = digits_cond.get_config()
  config.model.network = "score_unet"
  config.model.n_embd, config.model.n_layer, config.model.with_fourier_features = 64, 0, False
  config.sample.num_images, config.sample.num_steps = 4, 4
  config.sample.guidance_weight, config.sample.label = 2.0, 3
  setup = train.get_setup(config)
  state = setup.init_state()
  rng = np.random.default_rng(1662)  # EMA params away from init (whose output layer is zero)
  ema = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                     jax.device_get(state.ema_params))
  manager = checkpoints.make_manager(tmp_path / "checkpoints")
  checkpoints.save(manager, 1, state.replace(ema_params=ema), {"next_index": 1})
  manager.close()
  images = np.load(train.sample(config, str(tmp_path))["npy"])

  def expected(weight, label):
    labels = jnp.full((4,), label)
    eps_c, eps_null = setup.model.eps_fn(ema, labels=labels), setup.model.eps_fn(ema)
    guided = lambda z, g: (1 + weight) * eps_c(z, g) - weight * eps_null(z, g)
    gamma_fn = setup.model.gamma_fn(ema)
    z_0 = sampling.ancestral_sample(guided, gamma_fn, jax.random.PRNGKey(config.sample.seed),
                                    images.shape, num_steps=4)
    return np.asarray(decoders.decode(z_0, gamma_fn(jnp.zeros(4)), vocab_size=17))

  # Decoding takes an argmax: a pixel whose latent lies within float32 rounding (~1e-6) of a
  # bin edge (bins 2/17 wide) may flip, ~1e-5 per pixel; at most one of these 256 may differ.
  differ = lambda weight, label: int(np.sum(images != expected(weight, label)))
  assert differ(2.0, 3) <= 1
  assert differ(0.0, 3) > 10 and differ(2.0, 5) > 10  # guidance and the label both matter


@pytest.mark.parametrize("field, value, message", [
    ("data.dataset", "cifar11", "unknown data.dataset 'cifar11'"),
    ("training.num_steps", 0, "training.num_steps must be a positive integer, got 0"),
    ("training.batch_size", -8, "training.batch_size must be a positive integer"),
    ("sample.sampler", "euler", "sample.sampler must be one of"),
    ("cpu_devices", -1, "cpu_devices must be an integer >= 0"),
])
def test_bad_config_fails_fast_with_a_one_line_error(tmp_path, field, value, message):
  config = tiny_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message) as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(info.value)


def test_batch_not_divisible_by_device_count_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match=r"training.batch_size=8 is not divisible by the 3 devices"):
    train.validate_config(tiny_config(), str(tmp_path))


def test_cpu_devices_once_jax_started_takes_only_the_count_it_has(monkeypatch):
  """JAX fixes the CPU device count when its backends start (main.py sets it first)."""
  started = len(jax.devices("cpu"))  # starts the backends, as any earlier test has
  train.use_cpu_devices(started)  # the count it has: nothing to do
  train.use_cpu_devices(0)  # JAX's default: nothing to do
  with pytest.raises(ValueError, match=f"already started with {started} devices; call "
                     "vdm_jax.train.use_cpu_devices before JAX's first operation"):
    train.use_cpu_devices(started + 1)
  assert len(jax.devices("cpu")) == started
  config = tiny_config()
  config.cpu_devices = started + 1
  warnings = []
  monkeypatch.setattr(setup_lib.logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
  setup_lib.Setup(config)  # in-process use with a count it cannot have: a warning
  assert [w for w in warnings if f"cpu_devices={started + 1}, but this process has {started}" in w]


def test_the_loop_waits_for_the_step_steps_in_flight_back(monkeypatch):
  """At most loop.STEPS_IN_FLIGHT steps queued: the multi-CPU-device deadlock's bound."""
  waited, in_flight = [], collections.deque()
  monkeypatch.setattr(jax, "block_until_ready", waited.append)
  for step in range(6):
    loop.wait_for_older_steps(in_flight, {"step": step})
    assert [m["step"] for m in waited] == list(range(max(0, step + 1 - loop.STEPS_IN_FLIGHT)))
  assert [m["step"] for m in in_flight] == list(range(6 - loop.STEPS_IN_FLIGHT, 6))


def test_unwritable_workdir_fails_fast(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(ValueError, match="is not writable"):
    train.train_and_evaluate(tiny_config(), str(blocker / "run"))


def test_eval_without_checkpoint_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="train first with --mode=train"):
    train.evaluate(tiny_config(), str(tmp_path))
