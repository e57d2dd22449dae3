"""profile_decode end to end (``--tiny``, CPU; the step kernel in interpret mode)."""


def test_profile_decode_tiny(run_script):
  stdout, run_dir, result = run_script("benchmarks.profile_decode", "--backends=xla,pallas")
  assert [(r["batch"], r["backend"]) for r in result["rows"]] == [
      (b, v) for b in (1, 3) for v in ("xla", "pallas")]
  for r in result["rows"]:
    assert r["ms_per_step"] > 0
  assert {m["variant"] for m in result["micro"]} >= {"xla", "pallas block 64 warps 2"}
  for c in result["checks"]:  # the step kernel (interpret mode) and plain JAX against float64
    tol = 1e-5 if c["dtype"] == "float32" else 1e-2
    assert max(c["pallas_y_rel"], c["sequential_y_rel"]) < tol
    assert max(c["pallas_state_rel"], c["sequential_state_rel"]) < 1e-5
  assert result["lm_checks"][0]["greedy_agree"] == 1.0
  assert (run_dir / "profile_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Step against float64 NumPy" in stdout
