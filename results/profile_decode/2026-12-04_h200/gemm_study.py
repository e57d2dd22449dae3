"""Decode-shaped matrix products at 1.4B: 48 layers of (M x 2048) @ (2048 x 4096) then
(M x 4096) @ (4096 x 2048), weights distinct per layer (lax.scan over stacked weights), as XLA
compiles them (default, exhaustive tiling search, cuBLAS) and as JAX's Hopper Mosaic GPU matmul
(jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu) with a few tilings. Prints us per step and
GB/s of weight bytes."""
import json, os, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from jax import lax
sys.path.insert(0, os.getcwd())
from benchmarks import harness
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

L, DM, DI = int(os.environ.get("GS_L", 48)), 2048, 4096
out = []
key = jax.random.key(0)
w_in = jax.random.normal(key, (L, DM, DI), jnp.bfloat16) * 0.02
w_out = jax.random.normal(jax.random.key(1), (L, DI, DM), jnp.bfloat16) * 0.02
wbytes = 2 * L * (DM * DI + DI * DM)

def chain(mm):
  def f(x, wi, wo):
    def body(x, w):
      h = mm(x, w[0])
      return mm(h, w[1]), None
    return lax.scan(body, x, (wi, wo))[0]
  return f

xla_mm = lambda a, b: a @ b
variants = [("xla", lambda M: xla_mm, None),
            ("xla_exhaustive", lambda M: xla_mm, {"xla_gpu_exhaustive_tiling_search": True}),
            ("cublas", lambda M: xla_mm, {"xla_gpu_enable_triton_gemm": False})]
def mgpu(tn, tk, st):
  def make(M):
    cfg = hm.TuningConfig(tile_m=min(M, 128), tile_n=tn, tile_k=tk, max_concurrent_steps=st,
                          epi_tile_n=min(tn, 64), epi_tile_m=64)
    return lambda a, b: hm.matmul(a, b, None, cfg)
  return make
for tk, st in ((64, 6), (128, 4)):
  for tn in (32, 64):
    variants.append((f"mgpu_n{tn}x2_k{tk}_s{st}", mgpu(tn, tk, st), None))
for M in (64, 128, 16, 2):
  x = jax.random.normal(jax.random.key(2), (M, DM), jnp.bfloat16)
  ref = None
  for name, make, opts in variants:
    try:
      if name.startswith("mgpu") and M % 64:
        continue
      mm = make(M)
      f = jax.jit(chain(mm), compiler_options=opts)
      t0 = time.time(); y = f(x, w_in, w_out).block_until_ready(); comp = time.time() - t0
      if ref is None:
        ref = y
      err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))) / (jnp.max(jnp.abs(ref.astype(jnp.float32))) + 1e-30))
      s = harness.median_seconds(lambda: f(x, w_in, w_out), repeats=20, inner=5, warmup=2)
      row = dict(M=M, variant=name, us_per_step=s * 1e6, weight_GBps=wbytes / s / 1e9, compile_s=comp, rel_err=err)
    except Exception as e:
      row = dict(M=M, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    out.append(row)
    print(json.dumps(row), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "gemm_study.json"), "w"), indent=1)
