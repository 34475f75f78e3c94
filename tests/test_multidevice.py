"""Eight forced CPU devices give the same training run as one device.

The 8-device run happens in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set
before JAX starts); the 1-device run happens in this process.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import assert_params_match

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs 5 train steps (dropout on) and a sharded evaluation; saves losses, params, bpd.
WORKER = r'''
import sys
import jax
import numpy as np
from configs import digits
from vdm_jax import train
from vdm_jax.train import data

def tiny_config():
  config = digits.get_config()
  config.model.network = "score_unet"
  config.model.n_embd, config.model.n_layer, config.model.dropout = 64, 0, 0.1
  config.training.batch_size, config.training.num_steps = 8, 5
  config.eval.batch_size, config.eval.num_examples = 8, 20
  return config

def run(out):
  config = tiny_config()
  setup = train.get_setup(config)
  state = setup.init_state()
  iterator = data.train_iterator(data.load_digits("train"), batch_size=8, seed=0)
  losses, learning_rates = [], []
  for _ in range(5):
    state, metrics = setup.train_step(state, setup.global_batch(next(iterator)))
    losses.append(float(metrics["bpd"]))
    learning_rates.append(float(metrics["learning_rate"]))
  bpd = setup.evaluate_params(state.ema_params, data.load_digits("test"))["bpd"]
  try:
    config.training.batch_size = 12
    train.validate_config(config, "/tmp")
    error = ""
  except ValueError as e:
    error = str(e)
  leaves = {"param" + jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, losses=np.asarray(losses), bpd=bpd, devices=jax.device_count(), error=error,
           learning_rates=np.asarray(learning_rates), **leaves)

if __name__ == "__main__":
  run(sys.argv[1])
'''


@pytest.mark.slow
def test_eight_devices_match_one_device_after_five_steps(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "eight.npz")], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  namespace = {"__name__": "worker"}
  exec(compile(WORKER, "worker", "exec"), namespace)  # pylint: disable=exec-used
  namespace["run"](str(tmp_path / "one.npz"))

  one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(eight["bpd"], one["bpd"], rtol=1e-5)
  assert not np.allclose(one["losses"][0], one["losses"][-1])  # the runs did train
  params = lambda run: {k: run[k] for k in run.files if k.startswith("param")}
  assert len(params(one)) > 10
  assert_params_match(params(eight), params(one), learning_rates=one["learning_rates"])
  assert "training.batch_size=12 is not divisible by the 8 devices" in str(eight["error"])
  assert str(one["error"]) == ""
