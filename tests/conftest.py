"""Shared pytest fixtures: the reference fixture recorded from google-research/vdm.

The fixture lives in the repository (tests/fixtures/vdm_reference, a copy of the
project's shared/fixtures/vdm_reference), so a plain clone runs every test.
"""
import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "vdm_reference"


@pytest.fixture(scope="session")
def reference_dir():
  """Path of tests/fixtures/vdm_reference (arrays recorded from the original code)."""
  assert REFERENCE_DIR.is_dir(), f"reference fixture missing at {REFERENCE_DIR}"
  return REFERENCE_DIR
