"""Shared pytest setup: CPU, one compilation cache per test session, the reference fixture.

The fixture lives in the repository (tests/fixtures/vdm_reference, a copy of the
project's shared/fixtures/vdm_reference), so a plain clone runs every test.

Many tests build the same tiny trainer (train_helpers.tiny_config), in this process and
in main.py subprocesses. A persistent compilation cache in a fresh temporary folder,
shared by the xdist workers and the subprocesses they start (through the environment),
compiles each distinct program once per session. A fresh folder per session keeps a
compile-time regression visible (tests/test_paper_compile.py compiles with an empty cache).

The tests' programs are tiny, so XLA's CPU backend compiles them without LLVM's
expensive optimisations and with its older loop emitters instead of the MLIR fusion
emitters (XLA_FLAGS below, inherited by subprocesses; a test that adds flags appends to
them). The first cut about a quarter of the suite's time here, the emitters about a
fifth more (615 -> 484 s, 2026-12-01). The HLO passes, where the train step's compile
blow-up of issue 11 lived, still run.
"""
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # the session's first process
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdm_jax_test_xla_cache_")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "vdm_reference"


def pytest_collection_modifyitems(config, items):
  """Runs the tests marked slow first (stable order otherwise), so that with xdist no
  worker starts a minute-long test while the other has nothing left to do."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  """The process that made the session's compilation cache removes it at the end."""
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def reference_dir():
  """Path of tests/fixtures/vdm_reference (arrays recorded from the original code)."""
  assert REFERENCE_DIR.is_dir(), f"reference fixture missing at {REFERENCE_DIR}"
  return REFERENCE_DIR
