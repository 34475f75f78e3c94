"""Power-EMA snapshots for post-hoc EMA (Karras et al. 2024, EDM2 sec. 3.2): a never-pruned store.

The trainer tracks K power-function EMAs (TrainState.power_emas, exponents gamma_k from
optimizer.power_ema_sigma_rels) and copies them here every training.ema_snapshot_every
optimizer updates (0: at every checkpoint), and at the last step. Layout:

  workdir/ema_snapshots/<t>/         one orbax step per snapshot, t = applied optimizer
                                     updates averaged in (vdm_jax.ema.Snapshot.step)
    emas/                            the K EMAs, a tuple of param trees (K x params bytes)
    meta/                            JSON {"step": t, "train_step": n, "gammas": [K],
                                     "sigma_rels": [K]}, written by the primary process

It has its own CheckpointManager with max_to_keep=None: the rolling checkpoints' keep-N
never prunes it. A snapshot whose t already exists is not written again (a resumed run
passing the same update, or steps skipped as non-finite that left t where it was), so
each (step, gamma) pair appears once. The trainer waits for pending snapshot writes
before each checkpoint and writes the snapshot of a checkpoint step before the checkpoint,
so every checkpoint that a run resumes from has all the snapshots up to its step, and a
killed and resumed run ends with the same snapshots, bit for bit, as an uninterrupted one.

Reconstruction (reconstruct_sweep) solves vdm_jax.ema.posthoc_weights_sweep over all
stored (t, gamma_k) and sums the snapshots, read one step at a time, into one float32
accumulator per target width.
"""
import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vdm_jax import ema
from vdm_jax.train import checkpoints
from vdm_jax.train import step as step_lib
from vdm_jax.train.errors import CheckpointError
from vdm_jax.typing import Params

DIRECTORY = "ema_snapshots"


def make_store(workdir: str, *, create: bool = True) -> ocp.CheckpointManager:
  """The snapshot store workdir/ema_snapshots (never pruned); `.close()` it when done.

  Args:
    workdir: the run's folder.
    create: create the folder if missing (False for readers).

  Returns:
    ocp.CheckpointManager with items "emas" (pytree) and "meta" (JSON).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
  handlers = {"emas": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), DIRECTORY),
                               options=options, item_handlers=handlers)


def is_due(train_step: int, *, every_updates: int, accumulation_steps: int,
           checkpoint_every: int, last: bool) -> bool:
  """Whether train step `train_step` (1-based, done) ends with a snapshot.

  every_updates > 0: every every_updates * accumulation_steps train steps (every
  every_updates optimizer updates when none is skipped); 0: at the checkpoint steps
  (multiples of checkpoint_every). Always at the last step.
  """
  if last:
    return True
  period = every_updates * accumulation_steps if every_updates else checkpoint_every
  return train_step % period == 0


def save(store: ocp.CheckpointManager, train_step: int, state: step_lib.TrainState,
         sigma_rels: Sequence[float], gammas: Sequence[float]) -> bool:
  """Starts writing state.power_emas as the snapshot t = update_count(state.opt_state).

  Reads t back from the device (one scalar). Nothing is written, and False returned, when
  t = 0 (no update applied yet) or snapshot t exists already. Every process calls it
  (orbax writes the arrays together; the JSON only on the primary process).

  Raises:
    CheckpointError: an EMA holds NaN/Inf (nothing is written).
  """
  t = int(jax.device_get(step_lib.update_count(state.opt_state)))
  if t == 0 or t in store.all_steps():
    logging.info("train step %d: EMA snapshot of update %d %s", train_step, t,
                 "skipped (no update applied yet)" if t == 0 else "exists already; kept")
    return False
  bad = checkpoints.first_nonfinite_leaf(state.power_emas)
  if bad is not None:
    raise CheckpointError(f"refusing to write EMA snapshot {t}: NaN/Inf in power_emas/{bad}")
  meta = {"step": t, "train_step": int(train_step), "gammas": [float(g) for g in gammas],
          "sigma_rels": [float(s) for s in sigma_rels]}
  logging.info("writing EMA snapshot of update %d (train step %d)", t, train_step)
  args = ocp.args.Composite(emas=ocp.args.StandardSave(tuple(state.power_emas)),
                            meta=ocp.args.JsonSave(meta))
  return bool(store.save(t, args=args, force=True))


def read_index(store: ocp.CheckpointManager) -> list[dict[str, Any]]:
  """The stored snapshots' metadata, oldest first: [{"step", "train_step", "gammas",
  "sigma_rels"}], one dict per snapshot step (each holding K EMAs)."""
  store.reload()
  metas = []
  for t in sorted(store.all_steps()):
    meta = store.restore(t, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["step"] != t:
      raise CheckpointError(f"EMA snapshot {t} in {store.directory} says it is of update "
                            f"{meta['step']}; move it away")
    metas.append(meta)
  return metas


def load(store: ocp.CheckpointManager, step: int, abstract_params: Params,
         count: int) -> tuple:
  """The `count` EMAs of snapshot `step`, restored like abstract_params (ShapeDtypeStructs)."""
  target = tuple(abstract_params for _ in range(count))
  return tuple(store.restore(step, args=ocp.args.Composite(
      emas=ocp.args.StandardRestore(target)))["emas"])


@jax.jit
def _add_scaled(total, weight, params):
  """total + weight * params, leaf by leaf, in total's dtype (float32 or wider)."""
  return jax.tree.map(lambda acc, p: acc + (weight * p).astype(acc.dtype), total, params)


def reconstruct_sweep(store: ocp.CheckpointManager, abstract_params: Params,
                      sigma_rels: Sequence[float], *, step: Optional[int] = None
                      ) -> dict[str, Any]:
  """Post-hoc EMAs of widths sigma_rels at snapshot step `step` (default: the newest).

    params_m = sum_i w_mi snapshot_i,  w = ema.posthoc_weights_sweep(snapshots, sigma_rels)
  over the N = (snapshot steps) x K stored (t, gamma_k) profiles (EDM2 Algorithm 3),
  streaming: one snapshot step is read at a time (K param trees), steps with all-zero
  weights are not read; M float32 accumulators.

  Args:
    store: make_store(workdir, create=False).
    abstract_params: ShapeDtypeStructs (with shardings) of the params.
    sigma_rels: M target widths in (0, ema.MAX_SIGMA_REL].
    step: target update count t, one of the snapshot steps; None: the newest.

  Returns:
    {"step": target t, "snapshots": [N ema.Snapshot], "weights": [M, N] float64,
     "fit_errors": [M] relative L2 profile errors (ema.posthoc_fit_error),
     "params": [M] param trees in the params' dtypes}.
  """
  metas = read_index(store)
  if not metas:
    raise CheckpointError(f"no EMA snapshot in {store.directory}; train with "
                          f"optimizer.power_ema_sigma_rels set")
  snapshots = [ema.Snapshot(m["step"], g) for m in metas for g in m["gammas"]]
  steps = [m["step"] for m in metas]
  if step is not None and step not in steps:
    raise CheckpointError(f"no EMA snapshot of update {step} in {store.directory}; the "
                          f"target must be a snapshot step, one of {steps}")
  weights = ema.posthoc_weights_sweep(snapshots, sigma_rels, step=step)
  fit_errors = [ema.posthoc_fit_error(snapshots, w, s, step=step)
                for w, s in zip(weights, sigma_rels, strict=True)]
  totals = [jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32),
                                             device=a.sharding), abstract_params)
            for _ in sigma_rels]
  column = 0
  for meta in metas:
    count = len(meta["gammas"])
    block = weights[:, column:column + count]
    if np.any(block != 0.0):
      for k, params in enumerate(load(store, meta["step"], abstract_params, count)):
        for m, w in enumerate(block[:, k]):
          if w != 0.0:
            totals[m] = _add_scaled(totals[m], np.float32(w), params)
    column += count
  params = [jax.tree.map(lambda acc, a: acc.astype(a.dtype), total, abstract_params)
            for total in totals]
  return {"step": int(step if step is not None else steps[-1]), "snapshots": snapshots,
          "weights": weights, "fit_errors": fit_errors, "params": params}
