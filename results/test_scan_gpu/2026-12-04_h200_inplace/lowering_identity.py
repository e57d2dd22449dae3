"""Hashes of what the Mosaic GPU scan lowers to for the GPU, computed on a CPU: each kernel's Mosaic
GPU module without debug locations, and the StableHLO around them with the kernels blanked out.
Run in two checkouts and compare: equal hashes mean the same GPU program.

  python lowering_identity.py      # from a checkout's root (PYTHONPATH=. so that its ssmax is used)
"""
import hashlib
import re

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib import mosaic_gpu_dialect
from jax._src.lib.mlir import ir

import ssmax
from ssmax.pallas import selective_scan_mosaic as m

bf, f32 = jnp.bfloat16, jnp.float32
s = jax.ShapeDtypeStruct
sha = lambda text: hashlib.sha256(text.encode()).hexdigest()[:12]
print("ssmax from", ssmax.__file__)
for (b, l, d, n) in [(8, 2048, 1536, 16), (4, 2048, 4096, 16), (1, 32768, 2048, 16), (2, 37, 5, 3)]:
  for wg in ((1, 2) if n >= 8 else (1,)):
    args = (s((b, l, d), bf), s((b, l, d), bf), s((d, n), f32), s((b, l, 1, n), bf),
            s((b, l, 1, n), bf), s((d,), f32), s((b, l, d), bf), s((d,), f32), s((b, d, n), f32))

    def loss(*a, wg=wg):
      y, last = m.selective_scan(*a, delta_softplus=True, config=m.Config(bwd_warpgroups=wg))
      return y.astype(f32).sum() + last.sum()

    low = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*args).lower(
        lowering_platforms=("cuda",))
    kernels = []

    def walk(op):
      for region in op.regions:
        for block in region:
          for o in block:
            if o.name == "stablehlo.custom_call" and "mhlo.backend_config" in o.attributes:
              blob = bytes(ir.StringAttr(o.attributes["mhlo.backend_config"]["module"]).value_bytes)
              with mlir.make_ir_context() as ctx, ir.Location.unknown():
                mosaic_gpu_dialect.register_dialect(ctx)
                ctx.allow_unregistered_dialects = True  # the serialized stable_mosaic_gpu ops
                asm = ir.Module.parse(blob).operation.get_asm(enable_debug_info=False)
              kernels.append(sha(asm))
            walk(o)

    walk(low.compiler_ir("stablehlo").operation)
    outer = low.as_text(debug_info=False)
    outer = re.sub(r'(kernel_hash|module) = "(?:[^"\\]|\\.)*"', r"\1", outer)
    print(f"{(b, l, d, n)} bwd_warpgroups={wg}: kernels {' '.join(kernels)}; around {sha(outer)}")
