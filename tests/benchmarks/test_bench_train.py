"""bench_train end to end (``--tiny``, CPU), one process per configuration as on the GPU."""

import math

import pytest


def test_bench_train_tiny(run_script):
  _, run_dir, result = run_script("benchmarks.bench_train", "--isolate")
  rows = result["rows"]
  assert result["isolate"] and [r["backend"] for r in rows] == ["sequential", "associative"]
  for r in rows:
    assert r["status"] == "ok" and r["ms"] > 0 and r["compiled_peak_gib"] > 0
    assert math.isclose(r["tokens_per_s"], r["batch"] * r["length"] / (r["ms"] / 1e3),
                        rel_tol=1e-9)
    assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
  # Same initialisation and data: the backends agree on the first loss.
  assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-2)
  assert "| sequential | 2 |" in (run_dir / "bench_train.md").read_text()
  assert run_dir.name.endswith("_cpu")


def test_bench_train_tiny_packed_rows(run_script):
  """--packing=plain,packed: rows of documents (segment_ids) beside plain rows, same data."""
  _, run_dir, result = run_script("benchmarks.bench_train", "--backends=associative",
                                  "--packing=plain,packed", "--isolate=false")
  rows = result["rows"]
  assert [r["packing"] for r in rows] == ["plain", "packed"]
  assert all(r["status"] == "ok" and math.isfinite(r["first_loss"]) for r in rows)
  # The documents restart the scan and the convolution: not the plain row's loss.
  assert rows[0]["first_loss"] != rows[1]["first_loss"]
  assert "| associative | 2 | packed |" in (run_dir / "bench_train.md").read_text()
