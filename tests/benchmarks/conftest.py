"""Runs a benchmark script end to end as a subprocess on the CPU, into a temporary results root."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def run_script(tmp_path):
  """``run_script(module, *args, env=None) -> (stdout, run folder, record)`` for ``--tiny`` runs
  written under ``tmp_path``; the run folder is the one the index names current."""

  def run(module, *args, env=None):
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", f"--results_dir={tmp_path}",
                           *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    benchmark = module.rsplit(".", 1)[-1]
    index = json.loads((tmp_path / benchmark / "INDEX.json").read_text())
    run_dir = tmp_path / benchmark / index["current"]
    assert (run_dir / "README.md").read_text().count(f"python -m {module} --tiny") == 1
    return proc.stdout, run_dir, json.loads((run_dir / f"{benchmark}.json").read_text())

  return run
