"""Shared helpers of the trainer tests: a tiny digits config and workdir snapshots."""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import digits

# The trainer tests' model: a 32-wide, 0-block ScoreUNet whose real step compiles in
# seconds. In-process tests and main.py subprocesses (as --config.model.* flags) share it,
# so they share its programs through the session's compilation cache.
TINY_MODEL = {"network": "score_unet", "n_embd": 32, "n_layer": 0,
              "with_fourier_features": False}
TINY_MODEL_FLAGS = [f"--config.model.{name}={value}" for name, value in TINY_MODEL.items()]


def tiny_config(num_steps=20):
  """configs/digits with TINY_MODEL and small batches: a real step compiles in seconds."""
  config = digits.get_config()
  config.model.update(TINY_MODEL)
  config.cpu_devices = 0  # the devices this process's JAX has (configs/digits.py asks for 2)
  config.training.num_steps = num_steps
  config.training.batch_size = 8
  config.training.log_every = 5
  config.training.eval_every = 0
  config.training.checkpoint_every = 5
  config.training.keep_checkpoints = 5
  config.optimizer.warmup_steps = 2
  config.eval.batch_size = 16
  config.eval.num_examples = 24
  config.sample.num_images = 4
  config.sample.num_steps = 6
  config.sample.gif_frames = 3
  config.training.tensorboard = False  # log only: no TensorFlow import in the tests' trainers
  return config


# Adam's eps for tests that compare two float32 computations of the same steps. Gradients
# that are zero in exact arithmetic come out of float32 as rounding noise (the tiny
# ScoreUNet's conv_in bias: 4e-10 against 0.07 RMS over all leaves), and Adam's eps of 1e-8
# turns that noise into +-lr steps that differ between two fusions. With eps = 1e-3 such
# noise moves a parameter by lr * 1e-7, while the real gradients here (1e-2 to 1) keep
# their Adam steps nearly unchanged: the compared paths must then agree to float32 ulps.
NOISE_PROOF_ADAM_EPS = 1e-3


def snapshot(folder):
  """{relative path: sha256 of the file (or "<dir>")} of everything under `folder`."""
  result = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      result[os.path.relpath(os.path.join(root, name), folder)] = "<dir>"
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return result


def adam_displacement_bound(learning_rates, *, b1=0.9, b2=0.99):
  """Largest |param change| Adam can make over steps with these learning rates.

  Per step |m_hat / sqrt(v_hat)| <= 1 / sqrt(1 - b1^2 / b2) (Cauchy-Schwarz over the
  gradient history, bias corrections included, for b1^2 < b2), so the displacement is
  at most that factor times sum(lr).
  """
  assert b1 * b1 < b2
  return float(np.sum(learning_rates)) / np.sqrt(1.0 - b1 * b1 / b2)


def assert_params_match(actual, expected, *, learning_rates, rtol=1e-5, max_noise_fraction=1e-3):
  """Two training runs that differ only in float reduction order (device count, processes).

  The trees must have one structure. Every element must agree within `rtol` of its leaf's
  largest magnitude (or of Adam's displacement bound, the scale by which any parameter can
  have moved, if that is larger), except elements whose exact gradient is (near) zero: there Adam
  turns float noise into +-lr steps, so they may differ by up to twice Adam's
  displacement bound. At most max(1, max_noise_fraction * size) elements of a leaf may
  be such noise; a real sharding bug moves most elements.
  """
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  noise_bound = 2.0 * adam_displacement_bound(learning_rates)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    diff = np.abs(a - b)
    off = diff > rtol * (np.abs(b) + max(np.abs(b).max(), noise_bound))
    assert off.sum() <= max(1, max_noise_fraction * b.size), (
        f"{name}: {off.sum()} of {b.size} elements differ by more than {rtol} of the leaf's "
        f"scale (largest difference {diff.max():.3g})")
    assert np.all(diff <= noise_bound), (
        f"{name}: differs by {diff.max():.3g} > twice Adam's displacement bound {noise_bound:.3g}")


class _HookedBatches:
  """A training iterator whose batches pass through hook(n, batch); the rest is delegated."""

  def __init__(self, iterator, hook, count):
    self._iterator, self._hook, self._count = iterator, hook, count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    n, self._count[0] = self._count[0], self._count[0] + 1
    return self._hook(n, batch)

  def __getattr__(self, name):  # get_state, set_state, start_prefetch, close
    return getattr(self._iterator, name)


def train_until_preempted_at_batch(monkeypatch, config, workdir, index):
  """train_and_evaluate(config, workdir), interrupted (KeyboardInterrupt, as a preemption)
  when the loop takes training batch `index` (counted from 0; the loop reads ahead)."""
  import pytest  # pylint: disable=g-import-not-at-top
  from vdm_jax import train  # pylint: disable=g-import-not-at-top

  def crash(n, batch):
    if n == index:
      raise KeyboardInterrupt(f"simulated preemption at training batch {index}")
    return batch

  with monkeypatch.context() as patch:
    hook_train_batches(patch, crash)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))


def hook_train_batches(monkeypatch, hook):
  """Makes every training batch the loop takes pass through hook(n, batch) -> batch.

  n counts batches from 0 over all training iterators created from now on (the
  loop takes them a few steps ahead of training, as it did before). The hook may
  change the batch or raise (a simulated preemption).
  """
  from vdm_jax.train import data  # pylint: disable=g-import-not-at-top
  original, count = data.train_iterator, [0]
  monkeypatch.setattr(data, "train_iterator",
                      lambda *args, **kwargs: _HookedBatches(original(*args, **kwargs), hook,
                                                             count))


NAN_LOSS, NAN_GRAD = -1, -2  # first pixel of a batch: NaN loss / NaN gradient


@jax.custom_vjp
def _nan_gradient_if(loss, poison):
  return loss


def _fwd(loss, poison):
  return loss, poison


def _bwd(poison, g):
  return jnp.where(poison > 0, jnp.nan, 1.0) * g, jnp.zeros_like(poison)


_nan_gradient_if.defvjp(_fwd, _bwd)


class PoisonedModel:
  """A VDM whose loss is NaN (first pixel -1) or has a NaN gradient (first pixel -2)."""

  def __init__(self, model):
    self._model = model

  def __getattr__(self, name):
    return getattr(self._model, name)

  def loss(self, params, x, key, **kwargs):
    flag = x.reshape(x.shape[0], -1)[:, 0]
    loss, terms = self._model.loss(params, jnp.maximum(x, 0), key, **kwargs)
    loss = jnp.where(jnp.any(flag == NAN_LOSS), jnp.nan, loss)
    return _nan_gradient_if(loss, jnp.any(flag == NAN_GRAD).astype(jnp.float32)), terms
