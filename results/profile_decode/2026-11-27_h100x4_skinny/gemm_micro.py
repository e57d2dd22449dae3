"""Decode-shaped matmuls: time and achieved bandwidth (weights dominate the bytes)."""
import os, time, json, sys
import jax, jax.numpy as jnp, numpy as np
shapes = [(64, 2048, 8192), (64, 4096, 2048), (64, 4096, 160), (64, 2048, 50280),
          (128, 768, 3072), (128, 1536, 768), (128, 768, 50280), (1, 2048, 8192)]
out = []
for m, k, n in shapes:
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
  # many layers' worth in one call, as in a decode step: 20 products of distinct weights
  ws = [w + i for i in range(8)]
  f = jax.jit(lambda x, *ws: sum((x @ wi).astype(jnp.float32).sum() for wi in ws))
  f(x, *ws).block_until_ready()
  ts = []
  for _ in range(30):
    t = time.perf_counter(); f(x, *ws).block_until_ready(); ts.append(time.perf_counter() - t)
  s = float(np.median(ts)) / 8
  gbs = (k * n * 2 + m * k * 2 + m * n * 2) / s / 1e9
  out.append(dict(m=m, k=k, n=n, us=s * 1e6, GBps=gbs))
  print(f"{m:4d} x {k:5d} x {n:6d}: {s*1e6:8.1f} us  {gbs:7.0f} GB/s", flush=True)
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": out}))
