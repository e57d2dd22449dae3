"""Issue 18, defects 3 and 4: damaged Orbax checkpoints and bad checkpoint paths.

A damaged step (data files deleted, truncated or bit-flipped; step folder emptied) must raise a
``CorruptCheckpointError`` (a ValueError) naming the directory and the step, and leave the earlier
steps restorable; an interrupted save is listed by ``interrupted_saves``. Saving to a path that is
a file raised NotADirectoryError from an Orbax thread and then hung the process at exit.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from ssmax.io import checkpoint


def _linear(seed):
  return nnx.Linear(3, 4, rngs=nnx.Rngs(seed))


def _data_files(step_dir: pathlib.Path):
  return [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]


def _delete(step_dir):
  for p in _data_files(step_dir):
    p.unlink()


def _truncate(step_dir):
  for p in _data_files(step_dir):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def _flip(step_dir):
  for p in _data_files(step_dir):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  model = _linear(0)
  checkpoint.save(root, model, step=1)
  checkpoint.save(root, model, step=2)
  return root, np.asarray(model.kernel[...])


@pytest.mark.parametrize("damage", [_delete, _truncate, _flip, _empty])
def test_damaged_step_names_directory_and_step(saved, tmp_path, damage):
  root, kernel = saved
  run = tmp_path / "run"
  shutil.copytree(root, run)
  assert _data_files(run / "2")
  damage(run / "2")
  target = _linear(1)
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step 2 in .*run is corrupt"):
    checkpoint.restore(run, target, step=2)
  assert checkpoint.restore(run, target, step=1) == 1  # the previous step is intact
  np.testing.assert_array_equal(np.asarray(target.kernel[...]), kernel)


def test_interrupted_save_is_listed(saved, tmp_path):
  root, _ = saved
  run = tmp_path / "run"
  shutil.copytree(root, run)
  shutil.copytree(run / "2", run / "3.orbax-checkpoint-tmp-1234")
  assert checkpoint.all_steps(run) == [1, 2]
  assert [p.name for p in checkpoint.interrupted_saves(run)] == ["3.orbax-checkpoint-tmp-1234"]
  assert checkpoint.interrupted_saves(tmp_path / "missing") == []


def test_save_to_a_file_is_a_value_error_and_does_not_hang(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  script = textwrap.dedent(f"""
      from flax import nnx
      from ssmax.io import checkpoint
      model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      for target in [{str(tmp_path / 'file')!r}, {str(tmp_path / 'file' / 'sub')!r}]:
        try:
          checkpoint.save(target, model, step=1)
        except ValueError as e:
          print("ValueError:", e)
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)  # before the fix: NotADirectoryError, then minutes at exit
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith("ValueError")]
  assert len(lines) == 2 and all("is a file" in l for l in lines), out.stdout
