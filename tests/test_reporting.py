"""The trainer's reports: the log-only writer, the progress line, and a run without TensorFlow."""
import logging
import os
import pathlib
import subprocess
import sys
import types

from vdm_jax.train import reporting

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One training process with training.tensorboard = False (tiny_config's setting): it must
# train, evaluate and sample without importing TensorFlow or clu's writers.
NO_TENSORBOARD_RUN = r'''
import sys
from absl import logging
from train_helpers import tiny_config
from vdm_jax import train
logging.use_absl_handler()  # to stderr at INFO, as main.py's absl.app does
logging.set_verbosity(logging.INFO)
config = tiny_config()  # the programs of the other tests' tiny runs (compilation cache)
config.training.checkpoint_every = config.training.num_steps
train.train_and_evaluate(config, sys.argv[1])
print("imported:", sorted(m for m in ("tensorflow", "clu.metric_writers") if m in sys.modules))
'''


def test_log_writer_logs_sorted_scalars_like_clus_logging_writer(caplog):
  with caplog.at_level(logging.INFO):
    reporting.LogWriter().write_scalars(7, {"train/bpd": 1.234567891, "train/a": 2})
  assert "[7] train/a=2, train/bpd=1.23457" in caplog.text


def test_writers_send_scalars_to_the_callback_and_every_writer(caplog):
  got = []
  writer = reporting.make_writer("unused", lambda step, s: got.append((step, s)),
                                 tensorboard=False)
  with caplog.at_level(logging.INFO):
    writer.write_scalars(3, {"test/bpd": 1.5})
    writer.write_images(3, {"samples": [[0.0]]})
  assert got == [(3, {"test/bpd": 1.5})]
  assert "[3] test/bpd=1.5" in caplog.text and "Got images: {'samples': (1, 1)}" in caplog.text


def test_progress_line_extrapolates_the_wall_time_per_step_over_the_steps_left(
    caplog, monkeypatch):
  clock = [50.0]
  monkeypatch.setattr(reporting, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  metrics = reporting.Metrics(reporting.LogWriter(), reporting.NonfiniteCounter(3), None,
                              start=100, num_steps=1100)
  clock[0] = 60.0  # 100 steps in 10 s: the 900 steps left take 90 s
  metrics.add(200, {"nonfinite": 0.0, "bpd": 2.0})
  with caplog.at_level(logging.INFO):
    metrics.write(200)
  assert "step 200 of 1100 (18.2%), ETA 0:01:30" in caplog.text
  assert "[200] train/bpd=2, train/nonfinite=0, train/steps_per_sec=10" in caplog.text


def test_training_without_tensorboard_never_imports_tensorflow(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", NO_TENSORBOARD_RUN, str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "imported: []" in proc.stdout
  assert "[20] train/bpd=" in proc.stderr and "step 20 of 20 (100.0%), ETA 0:00:00" in proc.stderr
  assert not [name for name in os.listdir(tmp_path) if name.startswith("events.out")]
  assert os.listdir(tmp_path / "samples")
