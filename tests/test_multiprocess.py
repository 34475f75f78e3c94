"""Two processes on localhost (gloo collectives) train exactly like one process.

Both processes run `main.py` with --coordinator_address/--num_processes/
--process_id; each feeds its half of every global batch. The final
checkpoint they write together must equal a single-process run's.
"""
import os
import re
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import digits
from vdm_jax.train import checkpoints
from vdm_jax import train
from train_helpers import assert_params_match

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {"model.network": "score_unet", "model.n_embd": 64, "model.n_layer": 0,
             "model.dropout": 0.1,
             "training.batch_size": 8, "training.num_steps": 5, "training.log_every": 5,
             "training.checkpoint_every": 5, "training.eval_every": 0, "eval.batch_size": 8,
             "eval.num_examples": 16, "sample.num_images": 2, "sample.num_steps": 2,
             "training.tensorboard": False}


def _config():
  config = digits.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _final_params(workdir):
  setup = train.get_setup(_config())
  manager = checkpoints.make_manager(os.path.join(workdir, "checkpoints"))
  step, state, position = checkpoints.restore(manager, setup.abstract_state())
  manager.close()
  return step, state.params, position


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
  workdir = tmp_path / "two"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = [subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/digits.py", f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, output in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, output[-3000:]
  assert "JAX process 1 of 2" in outputs[1]

  expected = train.train_and_evaluate(_config(), str(tmp_path / "one"))
  step, two, position = _final_params(str(workdir))
  _, one, expected_position = _final_params(str(tmp_path / "one"))
  assert step == 5 and position == expected_position
  schedule = train.get_setup(_config()).schedule
  assert_params_match(two, one, learning_rates=[schedule(i) for i in range(step)])
  (printed,) = re.findall(r"^train: .*'bpd': ([0-9.e+-]+),", outputs[0], re.M)
  np.testing.assert_allclose(float(printed), expected["bpd"], rtol=1e-5)  # same test bpd
  assert "train:" not in outputs[1]  # only process 0 reports
  assert os.path.isdir(workdir / "samples") and not os.listdir(workdir / "samples") == []
