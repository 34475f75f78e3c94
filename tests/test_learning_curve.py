"""The trainer's learning curve: eval_history.jsonl and plots/learning_curve.png in the workdir."""
import json
import pytest

from PIL import Image

from train_helpers import tiny_config
from vdm_jax import train
from vdm_jax.train import artifacts


def test_a_redone_evaluation_replaces_its_step_and_later_ones(tmp_path):
  for step in (5, 10, 15):
    artifacts.record_evaluation(str(tmp_path), {"step": step, "elapsed_s": step * 2.0, "bpd": 3.0})
  history = artifacts.record_evaluation(str(tmp_path), {"step": 10, "elapsed_s": 99.0, "bpd": 2.5})
  assert [(r["step"], r["elapsed_s"]) for r in history] == [(5, 10.0), (10, 99.0)]
  assert artifacts.read_eval_history(str(tmp_path)) == history


@pytest.mark.slow
def test_training_records_each_evaluation_and_draws_the_curve_against_time_and_steps(tmp_path):
  config = tiny_config(num_steps=10)
  config.training.eval_every = 5
  metrics = train.train_and_evaluate(config, str(tmp_path))
  lines = (tmp_path / "eval_history.jsonl").read_text().splitlines()
  history = [json.loads(line) for line in lines]
  assert [r["step"] for r in history] == [5, 10]
  assert 0 < history[0]["elapsed_s"] < history[1]["elapsed_s"]
  assert history[-1]["bpd"] == metrics["bpd"]
  with Image.open(tmp_path / "plots" / "learning_curve.png") as image:
    assert image.width > image.height > 100  # two panels side by side
