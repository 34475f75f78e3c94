"""The Colab notebooks in colab/ run top to bottom, headless, in their TINY setting.

Each notebook is executed with nbclient in a fresh kernel of this interpreter
(a kernelspec written to a temporary JUPYTER_PATH, so nothing has to be
registered beforehand) with VDM_NOTEBOOK_TINY=1 and JAX_PLATFORMS=cpu; any
cell that raises fails the test. The quickstart runs from the repository root
on two forced CPU devices (its training and evaluation are sharded over all
devices), the others from colab/, so both working directories are covered.
TINY runs are dominated by XLA compile time, so the kernels compile with
XLA's cheapest optimisation level (the numbers of a TINY run mean nothing).
"""
import ast
import json
import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient
import pytest

COLAB_DIR = pathlib.Path(__file__).resolve().parents[1] / "colab"
REPO_ROOT = COLAB_DIR.parent
NOTEBOOKS = ("toy_2d", "quickstart", "guidance")
KERNEL_NAME = "vdm-jax-notebook-test"


def _read(name):
  return nbformat.read(COLAB_DIR / f"{name}.ipynb", as_version=4)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """Registers a kernel running sys.executable in a temp JUPYTER_PATH; returns its name."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "vdm_jax tests", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("VDM_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the TINY runs' temporary workdirs go with the test
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Colab
  return KERNEL_NAME


def _execute(name, kernel_name, cwd):
  notebook = _read(name)
  client = NotebookClient(notebook, kernel_name=kernel_name, timeout=600,
                          resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError naming the cell and its traceback
  return notebook


def _stdout(notebook):
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.mark.slow
def test_toy_2d_notebook_runs_from_colab_dir(kernel):
  notebook = _execute("toy_2d", kernel, COLAB_DIR)
  assert "TINY=True" in _stdout(notebook)


@pytest.mark.slow
def test_quickstart_notebook_runs_from_repo_root_on_two_devices(kernel, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
  notebook = _execute("quickstart", kernel, REPO_ROOT)
  out = _stdout(notebook)
  assert "TINY=True" in out and "devices: 2 x cpu" in out


@pytest.mark.slow
def test_guidance_notebook_runs_from_colab_dir(kernel):
  notebook = _execute("guidance", kernel, COLAB_DIR)
  assert "TINY=True" in _stdout(notebook)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  for cell in _read(name).cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def _private_uses(source):
  """Names with a leading underscore taken from vdm_jax modules in `source`."""
  tree = ast.parse(source)
  aliases, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vdm_jax"):
      aliases.update(a.asname or a.name for a in node.names)
      found += [a.name for a in node.names if a.name.startswith("_")]
    elif isinstance(node, ast.Import):
      aliases.update((a.asname or a.name).split(".")[0] for a in node.names
                     if a.name.startswith("vdm_jax"))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and isinstance(node.value, ast.Name) and node.value.id in aliases):
      found.append(f"{node.value.id}.{node.attr}")
  return found


def test_private_use_detector_flags_underscored_names():
  assert _private_uses("from vdm_jax import ode\node._data_prediction(1, 2, 3)") == [
      "ode._data_prediction"]
  assert _private_uses("from vdm_jax.ode import _data_prediction") == ["_data_prediction"]
  assert _private_uses("from vdm_jax import ode\node.time_grid(3)") == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_only_public_vdm_jax_names(name):
  source = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
  assert _private_uses(source) == []
