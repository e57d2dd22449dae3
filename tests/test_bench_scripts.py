"""The benchmark scripts run end to end (``--tiny``, CPU) and write consistent JSON.

Timings themselves are not checked (no performance claims in tests), only that every row ran and
that the derived numbers follow from the measured ones.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, out_dir, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", module, "--tiny", f"--out_dir={out_dir}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_bench_generate_tiny(tmp_path):
  stdout = _run("experiments.bench_generate", tmp_path)
  result = json.loads((tmp_path / "bench_generate.json").read_text())
  rows = result["rows"]
  assert {(r["model"], r["batch"]) for r in rows} == {
      (m, b) for m in ("mamba", "transformer") for b in (1, 3)}
  for r in rows:
    assert r["status"] == "ok" and r["ms"] > 0 and r["params"] > 0
    assert math.isclose(r["tokens_per_s"], r["batch"] * r["new_tokens"] / (r["ms"] / 1e3),
                        rel_tol=1e-9)
    assert r["prefill_ms"] > 0
    assert math.isclose(r["decode_ms_per_token"],
                        (r["ms"] - r["prefill_ms"]) / (r["new_tokens"] - 1), rel_tol=1e-9)
  by = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows}
  assert len(result["ratios"]) == 2
  for q in result["ratios"]:
    assert math.isclose(q["ratio"], by["mamba", q["batch"]] / by["transformer", q["batch"]])
  assert (tmp_path / "bench_generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (tmp_path / "bench_generate.md").read_text()
  assert "Mamba/Transformer" in table and "decode ms/token" in table and table.split("Official stack")[0] in stdout


def test_bench_train_tiny(tmp_path):
  # --isolate: one process per configuration, the path taken on the GPU.
  _run("experiments.bench_train", tmp_path, "--isolate")
  result = json.loads((tmp_path / "bench_train.json").read_text())
  rows = result["rows"]
  assert result["isolate"] and [r["backend"] for r in rows] == ["sequential", "associative"]
  for r in rows:
    assert r["status"] == "ok" and r["ms"] > 0 and r["compiled_peak_gib"] > 0
    assert math.isclose(r["tokens_per_s"], r["batch"] * r["length"] / (r["ms"] / 1e3),
                        rel_tol=1e-9)
    assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
  # Same initialisation and data: the backends agree on the first loss.
  assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-2)
  assert "| sequential | 2 |" in (tmp_path / "bench_train.md").read_text()



def test_profile_decode_tiny(tmp_path):
  stdout = _run("experiments.profile_decode", tmp_path, "--backends=xla,xla_nopad,pallas")
  result = json.loads((tmp_path / "profile_decode.json").read_text())
  assert [(r["batch"], r["backend"]) for r in result["rows"]] == [
      (b, v) for b in (1, 3) for v in ("xla", "xla_nopad", "pallas")]
  for r in result["rows"]:
    assert r["ms_per_step"] > 0
  assert {m["variant"] for m in result["micro"]} >= {"xla", "pallas block 64 warps 2"}
  for c in result["checks"]:  # the step kernel (interpret mode) and plain JAX against float64
    tol = 1e-5 if c["dtype"] == "float32" else 1e-2
    assert max(c["pallas_y_rel"], c["sequential_y_rel"]) < tol
    assert max(c["pallas_state_rel"], c["sequential_state_rel"]) < 1e-5
  assert result["lm_checks"][0]["greedy_agree"] == 1.0
  assert (tmp_path / "profile_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Step against float64 NumPy" in stdout
