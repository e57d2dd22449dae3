"""Skinny (decode-shaped) matmul on Mosaic GPU: split-K wgmma kernel vs XLA. Timing + check."""
import functools, json, os, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def skinny(a, b, *, tile_n=64, tile_k=64, splits=2, stages=4):
  m, k = a.shape
  _, n = b.shape
  assert k % (tile_k * splits) == 0 and n % tile_n == 0 and m % 64 == 0
  kps = k // tile_k // splits
  def tr(minor):
    sw = plgpu.find_swizzle(minor * 16)
    return (plgpu.TilingTransform((8, sw // 2)), plgpu.SwizzleTransform(sw))

  def kernel(a_gmem, b_gmem, o_gmem, o_smem, acc):
    s = pl.program_id(0)
    j = pl.program_id(1)

    def step(_, a_smem, b_smem):
      plgpu.wgmma(acc, a_smem, b_smem)
      plgpu.wgmma_wait(1)

    plgpu.emit_pipeline(
        step,
        in_specs=[plgpu.BlockSpec((m, tile_k), lambda i: (0, s * kps + i), transforms=tr(tile_k),
                                  delay_release=1),
                  plgpu.BlockSpec((tile_k, tile_n), lambda i: (s * kps + i, j), transforms=tr(tile_n),
                                  delay_release=1)],
        grid=(kps,), max_concurrent_steps=stages)(a_gmem, b_gmem)
    plgpu.wgmma_wait(0)
    o_smem[...] = acc[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(s * m, m), pl.ds(j * tile_n, tile_n)])
    plgpu.wait_smem_to_gmem(0)

  part = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((splits * m, n), jnp.float32),
      scratch_types=dict(o_smem=plgpu.SMEM((m, tile_n), jnp.float32),
                         acc=plgpu.ACC((m, tile_n), jnp.float32)),
      grid=(splits, n // tile_n), grid_names=("s", "n"))(a, b)
  return part.reshape(splits, m, n).sum(0).astype(a.dtype)


def bench(f, x, ws, reps=30):
  g = jax.jit(lambda x, *ws: [f(x, w) for w in ws])
  jax.block_until_ready(g(x, *ws))
  ts = []
  for _ in range(reps):
    t = time.perf_counter(); jax.block_until_ready(g(x, *ws)); ts.append(time.perf_counter() - t)
  return float(np.median(ts)) / len(ws)


shapes = [(64, 2048, 4096), (64, 4096, 2048), (64, 2048, 8192), (128, 2048, 4096), (128, 4096, 2048),
          (64, 768, 1536), (64, 1536, 768)]
configs = [dict(tile_n=64, tile_k=64, splits=1, stages=4), dict(tile_n=64, tile_k=64, splits=2, stages=4),
           dict(tile_n=64, tile_k=64, splits=4, stages=4), dict(tile_n=128, tile_k=64, splits=4, stages=4),
           dict(tile_n=128, tile_k=64, splits=2, stages=6), dict(tile_n=64, tile_k=128, splits=2, stages=3),
           dict(tile_n=32, tile_k=64, splits=2, stages=6)]
rows = []
for m, k, n in shapes:
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  ws = [jax.random.normal(jax.random.key(i + 1), (k, n), jnp.bfloat16) for i in range(8)]
  ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
  byts = k * n * 2 + m * k * 2 + m * n * 2
  t = bench(lambda x, w: x @ w, x, ws)
  rows.append(dict(m=m, k=k, n=n, impl="xla", us=t * 1e6, GBps=byts / t / 1e9))
  print(f"{m}x{k}x{n} xla: {t*1e6:7.1f} us {byts/t/1e9:6.0f} GB/s", flush=True)
  for c in configs:
    try:
      out = skinny(x, ws[0], **c)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
      t = bench(functools.partial(skinny, **c), x, ws)
      rows.append(dict(m=m, k=k, n=n, impl="skinny", **c, us=t * 1e6, GBps=byts / t / 1e9, relerr=err))
      print(f"{m}x{k}x{n} skinny {c}: {t*1e6:7.1f} us {byts/t/1e9:6.0f} GB/s relerr {err:.1e}", flush=True)
    except Exception as e:
      print(f"{m}x{k}x{n} skinny {c}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
      if not rows or rows[-1].get("failed") is None:
        traceback.print_exc()
      rows.append(dict(m=m, k=k, n=n, impl="skinny", **c, failed=str(e)[:300]))
json.dump(dict(device=str(jax.devices()[0].device_kind), xla_flags=os.environ.get("XLA_FLAGS", ""),
               rows=rows), open(sys.argv[1] if len(sys.argv) > 1 else "skinny.json", "w"), indent=1)
