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


DECODE_LOOP_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from benchmarks.profile_decode import decode_loop
from ssmax import nn as snn

model = snn.MambaLM(snn.MambaConfig(d_model=5, n_layer=2, vocab_size=37, d_state=3, d_conv=3),
                    rngs=nnx.Rngs(0))
_, cache = model.prefill(jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]]))
token = jnp.array([9, 10], jnp.int32)
# Two calls of 2 steps (not a multiple of d_conv = 3) continue as 4 steps of the shifted layout.
run = decode_loop(model, 2)
got = run(*run(cache, token))
want = (cache, token)
for _ in range(4):
  logits, c = model.step(*want)
  want = (c, jnp.argmax(logits[:, :37], axis=-1).astype(jnp.int32))
# jit against eager rounding (~1e-7); a conv state in the wrong layout would be off by its inputs.
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
print("ok")
"""


def test_decode_loop_leaves_the_cache_in_the_default_layout():
  # In a subprocess: importing the script defines its flags, which other benchmark tests share.
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", DECODE_LOOP_CHECK], cwd=root, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "ok"
