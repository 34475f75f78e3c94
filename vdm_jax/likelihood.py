r"""Bits per dimension of a whole dataset split, in one deterministic sharded pass.

  bpd = (1 / N) sum_n (1 / K) sum_k loss(x_n; t_nk, eps_nk, eps0_nk) / (D ln 2)

Every example is counted exactly once: the last partial batch is padded (and
every batch padded to a multiple of the local device count) and the padding is
masked out. Each example n gets its own key fold_in(key, n) (n = its position in
the split), and its K time samples are drawn by one call of the loss on K
copies of it, so with an antithetic loss the K times are t0 + k / K (mod 1).
The result therefore does not depend on the batch size, the padding or the
number of devices. With a discrete-time loss (T steps) and K = T the K
antithetic times fall one in each grid cell, so every one of the T diffusion
terms is evaluated exactly once (the exact T-term sum, one eps per term).

The loss is any `loss_fn(params, batch, key) -> (loss [B], terms)` with batch a
dict of arrays with leading axis B ({"image": int [B, H, W, C], optionally
"label": [B]}), loss in nats per example summed over H, W, C, and terms a dict
of [B] arrays (e.g. "prior", "reconstruction", "diffusion") that sum to loss.
For a model: `functools.partial(model_loss, train=False)` adapted to take the
batch dict; for an eps_fn / gamma_fn pair: `loss_fn_from_eps`.
"""
import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdm_jax import losses
from vdm_jax.ode_likelihood import ode_loss_fn, ode_nll  # noqa: F401 (re-exported)
from vdm_jax.typing import EpsFn, GammaFn, LossFn, Params, PRNGKey


def loss_fn_from_eps(eps_fn: EpsFn, gamma_fn: GammaFn, *, num_steps: int = 0,
                     vocab_size: int = 256) -> LossFn:
  """A loss_fn(params, batch, key) for `evaluate_bpd` from a fixed model (params unused).

  Returns losses.vdm_loss(eps_fn, gamma_fn, batch["image"], key, num_steps=num_steps,
  antithetic=True, vocab_size=vocab_size): (loss [B], {"prior", "reconstruction", "diffusion"}).
  """
  def loss_fn(params, batch, key):
    del params
    return losses.vdm_loss(eps_fn, gamma_fn, batch["image"], key, num_steps=num_steps,
                           antithetic=True, vocab_size=vocab_size)

  return loss_fn


def _masked_sums(loss_fn, num_time_samples, params, batch, index, mask, key):
  """Sums over the real examples of the batch of K-sample means of the loss and its terms."""
  def one_example(example, n):
    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (num_time_samples,) + a.shape), example)
    loss, terms = loss_fn(params, tiled, jax.random.fold_in(key, n))
    return jnp.mean(loss), {name: jnp.mean(value) for name, value in terms.items()}

  loss, terms = jax.vmap(one_example)(batch, index)
  weight = mask.astype(jnp.float32)
  sums = {name: jnp.sum(weight * value) for name, value in terms.items()}
  sums["loss"] = jnp.sum(weight * loss)
  sums["loss_squared"] = jnp.sum(weight * jnp.square(loss))
  sums["count"] = jnp.sum(weight)
  return sums


@functools.lru_cache(maxsize=16)
def _jitted_sums(loss_fn, num_time_samples):
  """One compiled pass step per (loss_fn, K), so repeated evaluations do not recompile."""
  return jax.jit(lambda p, b, i, m, k: _masked_sums(loss_fn, num_time_samples, p, b, i, m, k))


def _check_counts(counts, sums):
  missing = sorted(set(counts) - set(sums))
  if missing:
    terms = sorted(set(sums) - {"loss", "loss_squared", "count"})
    raise ValueError(f"counts {missing} are not terms of loss_fn (its terms: {terms}); "
                     f"name only terms that loss_fn returns")


def _pad(array, size):
  pad = size - array.shape[0]
  return np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)]) if pad else array


def _check_batch(batch):
  if not isinstance(batch, dict) or "image" not in batch:
    raise ValueError(f"each batch must be a dict with an 'image' array, got {type(batch).__name__}")
  image = np.asarray(batch["image"])
  if image.ndim < 2 or image.shape[0] < 1:
    raise ValueError(f"batch['image'] must be [B, H, W, C] with B >= 1, got shape {image.shape}")
  if any(np.shape(v)[:1] != image.shape[:1] for v in batch.values()):
    raise ValueError(f"all batch entries need the leading batch axis {image.shape[0]}")
  return {name: np.asarray(value) for name, value in batch.items()}


def evaluate_bpd(loss_fn: LossFn, batches: Iterable[dict], key: PRNGKey, *, params: Params = None,
                 num_time_samples: int = 1, mesh: Mesh | None = None,
                 counts: Sequence[str] = ()) -> dict[str, float]:
  r"""Bits/dim of every example of `batches`, with a per-term breakdown.

  Args:
    loss_fn: loss_fn(params, batch, key) -> (loss [B] nats, terms dict of [B] nats).
    batches: iterable of dicts of numpy arrays, "image": int [B, H, W, C] (B may vary;
      process-local shards when running on several hosts).
    key: PRNG key; example n uses fold_in(key, n).
    params: pytree passed to loss_fn (replicated on every device), may be None.
    num_time_samples: K >= 1 loss samples per example (antithetic in t when the loss is).
    mesh: jax.sharding.Mesh with one axis; the batch is split over its first axis.
      Default: all devices on an axis named "data".
    counts: names of terms that are per-example counts, not nats and not part of the
      loss (e.g. "nfe" of ode_likelihood.ode_loss_fn); each is reported as its mean per
      example, unconverted.

  Returns:
    dict of Python floats: "bpd" (mean total bits/dim), "bpd_stderr" (standard error
    of that mean over examples), one bits/dim entry per term name, one mean per name in
    `counts`, "nats" (mean nats per example), and "num_examples" (int N).
  """
  if isinstance(num_time_samples, bool) or not isinstance(num_time_samples, int) or num_time_samples < 1:
    raise ValueError(f"num_time_samples must be an int >= 1, got {num_time_samples!r}")
  mesh = Mesh(np.asarray(jax.devices()), ("data",)) if mesh is None else mesh
  data_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  step = _jitted_sums(loss_fn, num_time_samples)
  local_devices = mesh.devices.size // jax.process_count()
  totals, seen, padded_size, num_dims = {}, 0, 0, None

  for batch in batches:
    batch = _check_batch(batch)
    size = batch["image"].shape[0]
    num_dims = math.prod(batch["image"].shape[1:])
    padded_size = max(padded_size, -(-size // local_devices) * local_devices)
    # Global example number n, unique over processes: (local position) * P + process.
    index = (seen + np.arange(padded_size)) * jax.process_count() + jax.process_index()
    mask = np.arange(padded_size) < size
    arrays = ({k: _pad(v, padded_size) for k, v in batch.items()}, index.astype(np.int32), mask)
    arrays = jax.tree.map(lambda a: jax.make_array_from_process_local_data(data_sharding, a), arrays)
    sums = jax.device_get(step(params, *arrays, key))
    _check_counts(counts, sums)  # a misnamed count fails at the first batch
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value)
    seen += size

  if not totals or totals["count"] == 0:
    raise ValueError("batches yielded no examples")
  count = totals.pop("count")
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  mean = totals.pop("loss") / count
  var = max(totals.pop("loss_squared") / count - mean * mean, 0.0)
  result = {name: value / count * (1.0 if name in counts else to_bpd)
            for name, value in totals.items()}
  result.update(bpd=mean * to_bpd, nats=mean, num_examples=int(round(count)),
                bpd_stderr=math.sqrt(var / max(count - 1.0, 1.0)) * to_bpd)
  return result
