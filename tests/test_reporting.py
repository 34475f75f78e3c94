"""The trainer's reports: the log-only writer and the progress line (a run without
TensorFlow: tests/test_main.py, on its main.py run)."""
import logging
import types

from vdm_jax.train import reporting


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
