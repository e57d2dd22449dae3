"""bench_generate end to end (``--tiny``, CPU): every row ran and the derived numbers follow from
the measured ones. Timings themselves are not checked (no performance claims in tests)."""

import math


def test_bench_generate_tiny(run_script):
  stdout, run_dir, result = run_script("benchmarks.bench_generate")
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
  assert (run_dir / "bench_generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (run_dir / "bench_generate.md").read_text()
  assert "Mamba/Transformer" in table and "decode ms/token" in table
  assert table.split("Official stack")[0] in stdout
  assert table.split("Official stack")[0] in (run_dir / "bench_generate.log").read_text()
