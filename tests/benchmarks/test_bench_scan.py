"""bench_scan end to end (``--tiny``, CPU): the pure-JAX backends time, and a kernel config that
cannot run becomes an error row instead of ending the sweep."""

import math


def test_bench_scan_tiny(run_script):
  _, run_dir, report = run_script("benchmarks.bench_scan", "--backends=associative,sequential",
                                  "--configs=bad:no_such_field=1", "--config_modes=fwd")
  rows = {(r["backend"], r["mode"]): r for r in report["rows"]}
  assert set(rows) == {(b, m) for b in ("associative", "sequential") for m in ("fwd", "fwdbwd")} | {
      ("pallas[bad]", "fwd")}
  for be in ("associative", "sequential"):
    for mode in ("fwd", "fwdbwd"):
      r = rows[be, mode]
      assert r["status"] == "ok" and r["error"] is None and r["ms"] > 0
      assert math.isclose(r["frac_copy"], r["GBps"] / report["copy_GBps"])
  bad = rows["pallas[bad]", "fwd"]
  assert bad["status"].startswith("error: TypeError") and "no_such_field" in bad["status"]
  assert bad["config"] == {"no_such_field": 1}
  table = (run_dir / "bench_scan.md").read_text()
  assert "| tiny | associative |" in table and "| tiny | pallas[bad] |" in table


def test_bench_scan_packed_configs_get_rows_with_segment_ids(run_script):
  # A config row with --packed also runs with segment_ids (the kernel in the interpreter).
  _, _, report = run_script("benchmarks.bench_scan", "--backends=associative", "--packed",
                            "--modes=fwd", "--configs=rt:reset_tiles=true")
  rows = {r["backend"]: r for r in report["rows"]}
  assert set(rows) == {"associative", "associative+segments", "pallas[rt]", "pallas[rt]+segments"}
  assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows.values())
  assert rows["pallas[rt]+segments"]["config"] == {"reset_tiles": True}


def test_official_times_from_the_same_machine_join_the_table(run_script, tmp_path):
  # --report re-summarises a run with --official_json merged (a subprocess: absl flags are global).
  import json
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[2]
  _, run_dir, report = run_script("benchmarks.bench_scan", "--backends=associative")
  ms = {r["mode"]: r["ms"] for r in report["rows"]}
  off = tmp_path / "official_scan.json"

  def merge(device):
    off.write_text(json.dumps({"device": device, "tiny/mamba-cuda": dict(
        fwd_ms=ms["fwd"] / 2, fwdbwd_ms=ms["fwdbwd"] / 4, peak_fwdbwd_MiB=3.0)}))
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_scan",
                           f"--report={run_dir / 'bench_scan.json'}", f"--official_json={off}",
                           f"--out_dir={tmp_path / 'merged'}"], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})

  proc = merge(report["device"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  merged = json.loads((tmp_path / "merged" / "bench_scan.json").read_text())
  rows = {(r["backend"], r["mode"]): r for r in merged["rows"]}
  assert rows["official-cuda", "fwdbwd"]["peak_GiB"] == 3.0 / 1024
  table = (tmp_path / "merged" / "bench_scan.md").read_text()
  assert "timed on the same machine" in table and "| tiny | official-cuda |" in table
  # associative's x official columns: the official time over its own (0.50 and 0.25)
  assoc = next(l for l in table.splitlines() if l.startswith("| tiny | associative |"))
  assert assoc.rstrip(" |").split(" | ")[-2:] == ["0.50", "0.25"]
  proc = merge("another GPU")
  assert proc.returncode != 0 and "measured on another GPU" in proc.stderr
