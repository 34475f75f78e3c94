"""Shared pytest fixtures: the reference fixture folder and 64-bit numpy helpers."""
import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REFERENCE_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vdm_reference"


@pytest.fixture(scope="session")
def reference_dir():
  """Path of ../shared/fixtures/vdm_reference; skips the test when it is absent."""
  if not REFERENCE_DIR.is_dir():
    pytest.skip(f"reference fixture not found at {REFERENCE_DIR} (needs ../shared beside the checkout)")
  return REFERENCE_DIR
