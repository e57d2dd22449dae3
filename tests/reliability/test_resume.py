"""Issue 18, defects 1-3: no lost or corrupted runs (the resume semantics of experiments/train.py,
written in its module docstring).

A run killed with SIGKILL resumes bit-identically; ``resume`` without a checkpoint to continue from,
a plain rerun into a run's directory and a checkpoint ahead of ``steps`` are refused before anything
is overwritten; a damaged latest checkpoint falls back to the previous one, saying so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from experiments import models, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = tasks.SelectiveCopying(length=11, num_tokens=2, vocab_size=5)
SHAPE = models.ModelShape(vocab_size=5, d_model=8, n_layer=1, d_state=2, scan_backend="sequential")
CONFIG = train.TrainConfig(steps=12, batch_size=4, learning_rate=5e-3, log_every=2,
                           checkpoint_every=4, progress=False, eval_examples=4)


def _make(rngs):
  return models.make_model("mamba_s6", SHAPE, rngs)


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _records(run):
  lines = (run / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]


def _assert_same_params(a, b):
  a, b = _params(a), _params(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  run = tmp_path_factory.mktemp("full")
  return train.train(_make, TASK, CONFIG, run), run


def _data_files(step_dir):
  return [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]


def test_sigkill_then_resume_from_the_last_good_checkpoint_is_bit_identical(full, tmp_path):
  """Killed two steps past its checkpoint at 8; that checkpoint then damaged, so the resume falls
  back to step 4 (saying so) and still ends bit-identical to the run that was never stopped."""
  run = tmp_path / "run"
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {os.path.join(ROOT, 'tests', 'reliability')!r})
      import test_resume as t
      from experiments import train
      def kill(done):
        if done == 10:
          os.kill(os.getpid(), signal.SIGKILL)
      train.train(t._make, t.TASK, t.CONFIG, {str(run)!r}, on_step=kill)
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
  assert max(r["step"] for r in _records(run)) == 10
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
  for p in _data_files(run / "checkpoints" / "8"):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  with pytest.warns(RuntimeWarning, match=r"checkpoint step 8 is corrupt .*falling back"):
    resumed = train.train(_make, TASK, dataclasses.replace(CONFIG, resume=True), run)
  assert (run / "corrupt_checkpoint_8").is_dir()
  _assert_same_params(resumed.model, full[0].model)
  assert _records(run) == _records(full[1])


def test_resume_without_checkpoints_refuses_and_keeps_the_records(tmp_path):
  run = tmp_path / "run"
  config = dataclasses.replace(CONFIG, steps=2, checkpoint_every=0, resume=True)
  train.train(_make, TASK, config, run)  # resume into a new directory: a fresh run
  before = (run / "metrics.jsonl").read_text()
  with pytest.raises(ValueError, match=r"cannot resume run .*records up to step 2 but it has no "
                     r"checkpoints \(it ran with checkpoint_every=0\)"):
    train.train(_make, TASK, dataclasses.replace(config, steps=4), run)
  with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl has records\)"):
    train.train(_make, TASK, dataclasses.replace(config, resume=False), run)
  assert (run / "metrics.jsonl").read_text() == before


def test_interrupted_first_save_is_not_a_silent_restart(full, tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  shutil.copytree(full[1] / "checkpoints" / "8", run / "checkpoints" / "4.orbax-checkpoint-tmp-7")
  lines = (full[1] / "metrics.jsonl").read_text().splitlines()
  (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n{\"kind\": \"tr")  # killed mid-line
  with pytest.warns(RuntimeWarning, match=r"ignoring interrupted checkpoint saves"):
    with pytest.raises(ValueError, match=r"only interrupted saves \['4\.orbax-checkpoint-tmp-7'\]"):
      train.train(_make, TASK, dataclasses.replace(CONFIG, resume=True), run)


def test_checkpoint_ahead_of_steps_is_refused(full, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(full[1], run)
  before = (run / "metrics.jsonl").read_text()
  with pytest.raises(ValueError, match=r"steps=4: its latest checkpoint is at step 12, past that; "
                     r"pass steps >= 12"):
    train.train(_make, TASK, dataclasses.replace(CONFIG, steps=4, resume=True), run)
  assert (run / "metrics.jsonl").read_text() == before


def test_no_readable_checkpoint_names_run_and_steps(full, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(full[1], run)
  for step in (8, 12):
    for p in _data_files(run / "checkpoints" / str(step)):
      p.unlink()
  with pytest.warns(RuntimeWarning):
    with pytest.raises(ValueError, match=r"cannot resume run .*no checkpoint reads back \(step 12: "
                       r".*; step 8: "):
      train.train(_make, TASK, dataclasses.replace(CONFIG, resume=True), run)
