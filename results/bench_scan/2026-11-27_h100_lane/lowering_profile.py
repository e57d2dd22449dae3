"""Where the kernels' lowering time goes, on a CPU (lowering for CUDA needs no GPU).

    python results/bench_scan/2026-11-27_h100_lane/lowering_profile.py > lowering_profile.log

For each lowering semantics and benchmark shape: seconds to lower the forward and the
forward+backward for CUDA, and the share of Mosaic GPU's layout inference in it (cProfile).
"""
import cProfile
import pstats
import time

import jax
import jax.numpy as jnp

from benchmarks.scan_inputs import SHAPES
from ssmax.pallas import selective_scan_mosaic as mosaic


def lower(fn, args):
  prof = cProfile.Profile()
  t = time.perf_counter()
  prof.enable()
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  prof.disable()
  total = time.perf_counter() - t
  stats = pstats.Stats(prof).stats
  inference = sum(v[3] for k, v in stats.items()
                  if k[2] == "infer_layout" and k[0].endswith("layout_inference.py"))
  return total, inference


print("| lowering | shape | mode | lower s | of which layout inference s |")
print("|---|---|---|---|---|")
for lowering in ("lane", "warpgroup"):
  for shape in ("130m-train", "1.4b-train", "long-32k"):
    b, l, d, n = SHAPES[shape]
    s = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    args = (s((b, l, d), bf), s((b, l, d), bf), s((d, n), f32), s((b, l, 1, n), bf),
            s((b, l, 1, n), bf), s((d,), f32), s((b, l, d), bf), s((d,), f32))
    config = mosaic.Config(lowering=lowering, num_sms=132)

    def fwd(*a):
      return mosaic.selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True,
                                   config=config)[0]

    fwdbwd = jax.grad(lambda *a: fwd(*a).astype(f32).sum(), argnums=tuple(range(8)))
    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
      total, inference = lower(fn, args)
      print(f"| {lowering} | {shape} | {mode} | {total:.1f} | {inference:.1f} |", flush=True)
