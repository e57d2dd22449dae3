"""Smoke runs of the paper presets on the CPU: the command lines of the README, shortened to two
training steps (and, for Induction Heads, test lengths up to 2^10), run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(module, tmp_path, *args, preset="paper"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", module, f"--preset={preset}", "--steps=2",
                         "--progress=false", f"--out_dir={tmp_path}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((tmp_path / "results.json").read_text())


def test_selective_copying_paper_preset(tmp_path):
  # The paper's task, model and length 4096; a smaller batch and validation set keep it short.
  results = _run("experiments.selective_copying", tmp_path, "--models=s4,mamba_s6",
                 "--batch_size=4", "--eval_examples=8", "--checkpoint_every=0")
  assert results["task"]["length"] == 4096 and results["shape"]["d_model"] == 64
  assert set(results["models"]) == {"s4", "mamba_s6"}
  assert all(r["stopped_at_step"] == 2 for r in results["models"].values())
  assert (tmp_path / "accuracy_vs_step.png").exists()


def test_selective_copying_paper_80k_preset(tmp_path):
  # The GPU-budget protocol of the README, its cosine shortened to the last of two steps.
  results = _run("experiments.selective_copying", tmp_path, "--models=mamba_s6", "--batch_size=4",
                 "--eval_examples=8", "--checkpoint_every=0", "--decay_steps=1", preset="paper_80k")
  assert results["task"]["length"] == 4096 and results["shape"]["d_model"] == 64
  assert results["learning_rate"] == 1e-3 and results["grad_clip"] == 1.0
  assert results["lr_schedule"] == "cosine" and results["decay_steps"] == 1
  assert results["models"]["mamba_s6"]["stopped_at_step"] == 2


def test_induction_heads_paper_preset(tmp_path):
  results = _run("experiments.induction_heads", tmp_path, "--models=mamba_s6,mha_rope",
                 "--max_test_log2=10", "--eval_examples=8", "--checkpoint_every=0")
  assert results["task"]["length"] == 256
  rows = results["models"]
  assert rows["mha_rope"]["learning_rate"] == 2e-4 and rows["mamba_s6"]["learning_rate"] == 1e-3
  for r in rows.values():
    assert r["stopped_at_step"] == 2
    assert set(r["accuracy_by_length"]) == {str(2**k) for k in range(6, 11)}
    assert all(0.0 <= a <= 1.0 for a in r["accuracy_by_length"].values())
  assert (tmp_path / "accuracy_vs_length.png").exists()
