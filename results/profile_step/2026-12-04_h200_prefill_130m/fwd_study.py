"""The fused scan's inference forward (no saved states) at the prefill shapes, bf16 inputs as the
mixer passes them: configs side by side, ms per call (median of 20 x 5) and state-updates/s."""
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from benchmarks import harness
from ssmax import pallas
from ssmax.pallas.selective_scan_mosaic import Config

bf, f32 = jnp.bfloat16, jnp.float32
shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get(
    "FS_SHAPES", "64x2048x1536,64x2048x4096,8x2048x1536").split(",")]
configs = [("default", {})] + [(name, dict(kv)) for name, kv in json.loads(
    os.environ.get("FS_CONFIGS", "[]"))]
out = []
for (b, l, d) in shapes:
  n = 16
  ks = jax.random.split(jax.random.key(0), 8)
  u = jax.random.normal(ks[0], (b, l, d), bf)
  dt = (jax.random.normal(ks[1], (b, l, d), f32) * 0.5 - 2).astype(bf)
  A = -jnp.exp(jax.random.normal(ks[2], (d, n), f32) * 0.5)
  B = jax.random.normal(ks[3], (b, l, 1, n), bf)
  C = jax.random.normal(ks[4], (b, l, 1, n), bf)
  z = jax.random.normal(ks[5], (b, l, d), bf)
  D = jnp.ones((d,), f32); bias = jnp.full((d,), -1.0, f32)
  ref = None
  for name, kv in configs:
    cfg = Config(**kv)
    f = jax.jit(lambda *a, cfg=cfg: pallas.selective_scan(*a, delta_softplus=True, config=cfg, interpret=bool(os.environ.get("FS_INTERPRET"))))
    try:
      t0 = time.perf_counter()
      y, last = f(u, dt, A, B, C, D, z, bias)
      jax.block_until_ready(y)
      comp = time.perf_counter() - t0
      yf = y.astype(f32)
      if ref is None:
        ref = (yf, last)
      err = float(jnp.max(jnp.abs(yf - ref[0])) / jnp.max(jnp.abs(ref[0])))
      lerr = float(jnp.max(jnp.abs(last - ref[1])) / jnp.max(jnp.abs(ref[1])))
      s = harness.median_seconds(lambda: f(u, dt, A, B, C, D, z, bias), repeats=20, inner=5, warmup=2)
      row = dict(shape=[b, l, d, n], config=name, ms=s * 1e3, compile_s=comp,
                 Tupd_per_s=b * l * d * n / s / 1e12, rel_err_y=err, rel_err_last=lerr)
    except Exception as e:
      row = dict(shape=[b, l, d, n], config=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    out.append(row)
    print(json.dumps(row), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), os.environ.get("FS_NAME", "fwd_study") + ".json"), "w"), indent=1)
