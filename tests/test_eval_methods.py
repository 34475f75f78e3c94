"""--mode=eval beyond the trainer's ELBO: the ODE likelihood, and clu checkpoints of the
original google-research/vdm code (main.py --checkpoint)."""
import os
import pathlib
import re
import subprocess
import sys

import flax.serialization
import numpy as np

from test_reference_checkpoint import _save
from test_reference_checkpoint import _state
from train_helpers import tiny_config
from vdm_jax import train
from vdm_jax.train import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/cifar10.py shrunk to the reference fixture's learnable_scalar model (manifest.json).
FIXTURE_MODEL = ("--config.model.image_shape=(8, 8, 3)", "--config.model.n_embd=32",
                 "--config.model.n_layer=2", "--config.model.with_attention=True",
                 "--config.model.dropout=0.0")


def _clu_checkpoint(reference_dir, tmp_path):
  raw = flax.serialization.msgpack_restore(
      (reference_dir / "params_learnable_scalar.msgpack").read_bytes())
  return _save(tmp_path / "reference_workdir" / "checkpoints",
               _state(raw["params"], raw["params"], step=1000))


def _eval_with_main(tmp_path, checkpoint, *overrides):
  data = tmp_path / "test.npz"
  np.savez(data, image=np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), np.int32))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, "main.py", "--mode=eval", "--config=configs/cifar10.py",
             f"--workdir={tmp_path / 'eval'}", f"--checkpoint={checkpoint}",
             "--config.data.dataset=npz", f"--config.data.path={data}",
             "--config.eval.batch_size=8", "--config.eval.num_examples=8",
             "--config.eval.num_time_samples=1", *FIXTURE_MODEL, *overrides]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def test_main_evaluates_a_clu_checkpoint_of_the_reference_code(reference_dir, tmp_path):
  proc = _eval_with_main(tmp_path, _clu_checkpoint(reference_dir, tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (printed,) = re.findall(r"^eval: .*'bpd': ([0-9.e+-]+),", proc.stdout, re.M)
  # Untrained-quality parameters on random pixels: finite, and not below 0 bits.
  assert np.isfinite(float(printed)) and float(printed) > 0
  assert not os.path.exists(tmp_path / "eval" / "checkpoints")  # eval only reads


def test_main_refuses_a_clu_checkpoint_of_another_shape_naming_the_leaf(reference_dir, tmp_path):
  proc = _eval_with_main(tmp_path, _clu_checkpoint(reference_dir, tmp_path),
                         "--config.model.n_embd=64")
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()[-1:]
  assert line.startswith("error: ") and "score_model/" in line and "shape" in line


def test_ode_method_reports_the_ode_bound_term_by_term():
  config = tiny_config()
  config.eval.batch_size, config.eval.num_examples = 4, 4
  config.eval.method, config.eval.ode_rtol, config.eval.ode_atol = "ode", 1e-3, 1e-3
  setup = train.Setup(config)
  test = data.load_sources(config, ("test",))["test"]
  result = setup.evaluate_params(setup.init_state().ema_params, test)
  terms = {k: v for k, v in result.items() if k.startswith("bpd_") and k != "bpd_stderr"}
  assert sorted(terms) == ["bpd_dequantization", "bpd_flow", "bpd_prior", "bpd_reconstruction"]
  assert np.isfinite(result["bpd"]) and result["num_examples"] == 4
  # The terms sum to the bound (float32 sums of four terms of a few bits each).
  np.testing.assert_allclose(sum(terms.values()), result["bpd"], rtol=1e-5)
  # Mean network evaluations per example: 6 per Tsit5 step plus 1, so at least 7.
  assert result["nfe"] >= 7
