"""profile_scan end to end (``--tiny``, CPU): a row per variant and mode, and its table. Off the GPU
the profiler's GPU lines are empty, so the kernel lists are too."""


def test_profile_scan_tiny(run_script):
  _, run_dir, report = run_script("benchmarks.profile_scan", "--backends=associative",
                                  "--modes=fwd,fwdbwd", "--configs=w1:bwd_warpgroups=1")
  rows = {(r["backend"], r["mode"]): r for r in report["rows"]}
  assert set(rows) == {(b, m) for b in ("associative", "pallas[w1]") for m in ("fwd", "fwdbwd")}
  assert all(r["shape"] == "tiny" and r["kernels"] == [] and r["busy_us"] == 0
             for r in rows.values())
  table = (run_dir / "profile_scan.md").read_text()
  assert "| tiny | pallas[w1] | fwdbwd | **all kernels** |" in table
