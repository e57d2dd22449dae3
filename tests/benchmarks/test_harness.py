"""The shared harness: timing arithmetic, failures as rows, run folders and the index."""

import datetime
import json
import os

import pytest

from benchmarks import harness


def test_median_seconds_calls_warmup_then_repeats_times_inner():
  calls = []
  harness.median_seconds(lambda: calls.append(1) or 0, repeats=4, warmup=3, inner=5)
  assert len(calls) == 3 + 4 * 5


def test_median_seconds_budget_cuts_slow_calls_to_three_measurements():
  calls = []

  def slow():
    calls.append(1)
    for _ in range(10**6):  # ~tens of ms in pure Python
      pass
    return 0

  harness.median_seconds(slow, repeats=100, warmup=1, inner=5, budget_s=1e-3)
  assert len(calls) == 1 + 3


def test_is_oom_and_attempt():
  assert harness.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not harness.is_oom(ValueError("bad shape"))

  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  def broken():
    raise ValueError("x" * 1000)

  logged = []
  assert harness.attempt(lambda: {"ms": 1.0}) == {"status": "ok", "ms": 1.0}
  assert harness.attempt(oom, logged.append) == {"status": "OOM"}
  assert not logged  # an OOM is an expected outcome, no traceback
  status = harness.attempt(broken, logged.append)["status"]
  assert status.startswith("error: ValueError: xxx") and len(status) < 330
  assert "Traceback" in logged[0]


def test_parse_configs():
  assert harness.parse_configs("c8:chunk=8; w:bwd_num_warps=4,layout=tile,reload=false,x=0.5;") == [
      ("c8", {"chunk": 8}), ("w", {"bwd_num_warps": 4, "layout": "tile", "reload": False, "x": 0.5})]
  assert harness.parse_configs("") == []


def test_runs_go_to_dated_device_folders_and_the_index_names_the_current(tmp_path, monkeypatch):
  monkeypatch.setattr("sys.argv", ["bench_x.py", "--flag=1"])
  today = datetime.date.today().isoformat()
  first = harness.Run("bench_x", results_dir=tmp_path, device="h100", meta={"device": "H100"})
  first.record["rows"] = [{"a": 1}]
  first.log("hello")
  first.save("| a |", plot=lambda record, path: path.write_bytes(b"png"))
  assert first.finish("first run") == tmp_path / "bench_x" / f"{today}_h100"
  assert first.path(".json").exists() and first.path(".png").read_bytes() == b"png"
  assert (first.dir / "bench_x.log").read_text() == "hello\n"
  assert "python -m benchmarks.bench_x --flag=1" in (first.dir / "README.md").read_text()

  second = harness.Run("bench_x", results_dir=tmp_path, device="h100", tag="rerun")
  second.save()
  second.finish()
  third = harness.Run("bench_x", results_dir=tmp_path, device="h100")  # same day: a new folder
  third.save()
  third.finish()
  assert third.dir.name == f"{today}_h100_2"

  index = json.loads((tmp_path / "bench_x" / "INDEX.json").read_text())
  assert [r["run"] for r in index["runs"]] == [f"{today}_h100", f"{today}_h100_rerun",
                                               f"{today}_h100_2"]
  assert index["current"] == f"{today}_h100"  # only the first, or one asked for, becomes current
  assert harness.load_current("bench_x", tmp_path) == {"bench_x": {
      **first.record, "rows": [{"a": 1}]}}

  fourth = harness.Run("bench_x", results_dir=tmp_path, device="h100", current=True)
  fourth.save()
  fourth.finish()
  assert harness.current_run("bench_x", tmp_path) == fourth.dir


def test_out_dir_is_not_indexed(tmp_path):
  run = harness.Run("bench_y", out_dir=tmp_path / "here")
  run.save("t")
  run.finish()
  assert (tmp_path / "here" / "bench_y.md").read_text() == "t\n"
  assert harness.current_run("bench_y", tmp_path) is None
  assert harness.load_current("bench_y", tmp_path) == {}


@pytest.mark.parametrize("benchmark", ["bench_scan", "bench_generate", "bench_train",
                                       "profile_decode", "induction_heads"])
def test_the_committed_results_have_a_current_run(benchmark):
  folder = harness.current_run(benchmark)
  assert folder is not None and folder.is_dir() and (folder / "README.md").is_file()
  assert harness.load_current(benchmark)


@pytest.mark.parametrize("platform,kind,slug", [
    ("gpu", "NVIDIA H100 80GB HBM3", "h100"), ("gpu", "NVIDIA A100-SXM4-40GB", "a100"),
    ("cpu", "cpu", "cpu")])
def test_device_slug(platform, kind, slug):
  device = type("Device", (), dict(platform=platform, device_kind=kind))()
  assert harness.device_slug(device) == slug


def test_paired_seconds_alternates_and_gives_the_ratio():
  import time
  order = []

  def sleeper(name, seconds):
    def fn():
      order.append(name)
      time.sleep(seconds)
      return 0
    return fn

  got = harness.paired_seconds(sleeper("a", 2e-3), sleeper("b", 6e-3), repeats=6, warmup=1, inner=2)
  assert order[:2] == ["a", "b"]  # warm-up
  timed = order[2:]
  assert len(timed) == 6 * 2 * 2
  # measurement pairs alternate which goes first: a a b b, b b a a, ...
  assert timed[:8] == ["a", "a", "b", "b", "b", "b", "a", "a"]
  assert 2.0 < got["ratio"] < 4.0 and got["ratio_q25"] <= got["ratio"] <= got["ratio_q75"]
  assert got["b"] > got["a"] >= 2e-3


def test_bench_scan_rounds_alternate_the_order(run_script):
  _, run_dir, report = run_script("benchmarks.bench_scan", "--backends=associative", "--packed",
                                  "--modes=fwd", "--rounds=2")
  assert [(r["backend"], r["round"]) for r in report["rows"]] == [
      ("associative", 0), ("associative+segments", 0), ("associative+segments", 1),
      ("associative", 1)]
  assert "per round" in (run_dir / "bench_scan.md").read_text()


def test_bench_scan_paired(run_script):
  _, run_dir, report = run_script("benchmarks.bench_scan", "--backends=associative", "--packed",
                                  "--modes=fwd", "--paired=3")
  assert report["rows"] == []
  (pair,) = report["paired"]
  assert pair["status"] == "ok" and pair["ratio"] > 0 and (pair["shape"], pair["mode"]) == ("tiny", "fwd")
  assert "timed alternately" in (run_dir / "bench_scan.md").read_text()


def test_bench_scan_paired_needs_packed():
  import os
  import subprocess
  import sys
  from pathlib import Path
  proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scan", "--tiny", "--paired=3",
                         "--out_dir=/nonexistent/never_written"],
                        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode != 0 and "--paired needs --packed" in proc.stderr


def test_run_worker_passes_the_spec_and_raises_with_stderr(tmp_path):
  (tmp_path / "echo_worker.py").write_text(
      "import json, pathlib, sys\n"
      "spec = json.loads(sys.argv[1].removeprefix('--worker='))\n"
      "if spec.get('fail'):\n"
      "  sys.exit('it failed: ' + spec['fail'])\n"
      "pathlib.Path(spec['out']).write_text(str(spec['n'] * 2))\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  out = tmp_path / "out.txt"
  harness.run_worker("echo_worker", dict(n=21, out=str(out)), env)
  assert out.read_text() == "42"
  with pytest.raises(RuntimeError, match=r"echo_worker --worker failed for .*\n.*it failed: badly"):
    harness.run_worker("echo_worker", dict(fail="badly"), env)
