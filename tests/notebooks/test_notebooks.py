"""The teaching notebooks: each executes headless from a fresh kernel and is committed stripped.

Every notebook under ``notebooks/`` runs top to bottom in a new IPython kernel started with this
interpreter (``sys.executable``, so the same virtual environment), on the CPU, with a per-cell
timeout. A cell that raises fails the test with the cell's traceback; a notebook that draws no
figure fails too (its plots must render). The files in git carry no outputs, so diffs stay
reviewable.
"""

import json
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL = "ssmax-test-python"


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
  """A kernel running this interpreter, CPU only, with a non-interactive matplotlib fallback."""
  spec_dir = tmp_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ssmax tests",
      "language": "python",
      "env": {"MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_s4_from_first_principles.ipynb", "02_selective_scan.ipynb",
                   "03_mamba_model.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{path.name} has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{path.name}: code cell {i} has stored outputs"
    assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_headless(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                          allow_errors=False, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert figures, f"{path.name} drew no figure"
