"""bench_parallel end to end on 4 fake CPU devices (``--tiny``, without the length search), and
the search's bisection on its own."""

from benchmarks import bench_parallel


def test_bench_parallel_tiny_on_four_cpu_devices(run_script):
  _, run_dir, result = run_script(
      "benchmarks.bench_parallel", "--repeats=1", "--nosearch",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert result["n"] == 4 and result["tiny"] and run_dir.name.endswith("_cpux4")
  assert [r["devices"] for r in result["scan"]] == [1, 4]
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["scan"])
  assert [r["mesh"] for r in result["train"]] == ["data=1", "data=4", "seq=4"]
  assert all(r["step_ms"] > 0 for r in result["train"])
  assert result["longest_fit"] == []  # --nosearch
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
