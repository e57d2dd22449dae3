"""bench_parallel end to end on 4 fake CPU devices (``--tiny``, without the length search), and
the search's bisection on its own."""

from benchmarks import bench_parallel


def test_bench_parallel_tiny_on_four_cpu_devices(run_script):
  _, run_dir, result = run_script(
      "benchmarks.bench_parallel", "--repeats=1", "--parts=scan,train",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert result["n"] == 4 and result["tiny"] and run_dir.name.endswith("_cpux4")
  assert [r["devices"] for r in result["scan"]] == [1, 4]
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["scan"])
  assert [r["mesh"] for r in result["train"]] == ["data=1", "data=4", "seq=4"]
  assert [r["batch"] for r in result["train"]] == [2, 8, 2]  # same rows per device for data=N
  assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in result["train"])
  assert result["longest_fit"] == []  # not in --parts
  assert "speed-up" in (run_dir / "bench_parallel.md").read_text()


def test_longest_fit_bisects_to_the_granularity():
  got = bench_parallel.longest_fit(lambda n: n <= 5000, 1024, 1 << 20, 256)
  assert got["longest"] == 4864 and got["first_failure"] == 5120 and not got["capped"]
  assert all(v == (int(k) <= 5000) for k, v in got["tried"].items())


def test_longest_fit_at_the_cap_and_never():
  always = bench_parallel.longest_fit(lambda n: True, 1024, 5000, 256)
  assert always["longest"] == 4096 and always["capped"]
  never = bench_parallel.longest_fit(lambda n: False, 1024, 1 << 20, 256)
  assert never["longest"] is None and never["first_failure"] == 256


def test_tried_lengths_records_the_longest_fit_and_first_failure_among_them():
  got = bench_parallel.tried_lengths(lambda n: n <= 150000, [163840, 147456, 73728])
  assert got["longest"] == 147456 and got["first_failure"] == 163840 and not got["capped"]
  assert list(got["tried"]) == ["73728", "147456", "163840"]
  every = bench_parallel.tried_lengths(lambda n: True, [147456])
  assert every["longest"] == 147456 and every["first_failure"] is None and every["capped"]
  settings = bench_parallel.Settings((1, 64, 8, 4), 2, 32, "tiny", 16, 32, 16)
  record = dict(settings=vars(settings), dtype="bfloat16", backend="pallas", device="GPU",
                scan=[], train=[], longest_fit=[dict(devices=2, status="ok", **every)])
  text = bench_parallel.tables(record)
  assert "only the lengths given were tried" in text and "| 2 | 147456 | none tried | - |" in text


def test_tables_show_failed_rows_and_leave_their_ratios_out():
  settings = bench_parallel.Settings((1, 64, 8, 4), 2, 32, "tiny", 16, 32, 16)
  ok = dict(status="ok", step_ms=10.0, tokens_per_s=6400.0)
  train = [dict(devices=1, mesh="data=1", batch=2, **ok),
           dict(devices=2, mesh="data=2", batch=4, status="OOM"),
           dict(devices=2, mesh="seq=2", batch=2, status="ok", step_ms=6.0, tokens_per_s=6400 / 0.6)]
  record = dict(settings=vars(settings), dtype="float32", backend="pallas", device="GPU",
                scan=[], longest_fit=[], train=train)
  text = bench_parallel.tables(record)
  assert "| 2 | data=2 | 4 | OOM | OOM | - |" in text
  assert "| 2 | seq=2 | 2 | 6.00 | 10,667 | 1.67x |" in text
