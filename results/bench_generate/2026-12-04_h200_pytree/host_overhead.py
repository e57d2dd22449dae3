"""Host time a jitted call spends getting the model in: nnx.split every call (ssmax.nn.generate
before aa1d3c1) against passing the model as the pytree Flax 0.12 makes it (since). The jitted
function does nothing with the parameters, so what is timed is the host's work. Prints a table and
writes host_overhead.json beside this script.

  PYTHONPATH=. python results/bench_generate/2026-12-04_h200_pytree/host_overhead.py
"""
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.lm_sizes import build


def ms_per_call(fn, n=30):
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t) / n * 1e3


rows = []
for size in ("130m", "1.4b"):
  model = build("mamba", size, dtype=jnp.bfloat16)
  tok = jnp.zeros((1, 8), jnp.int32)
  graphdef, state = nnx.split(model)
  by_state = jax.jit(lambda state, t: t + 1)
  by_model = jax.jit(lambda model, t: t + 1)
  rows.append(dict(
      size=size, leaves=len(jax.tree.leaves(state)),
      split_each_call_ms=ms_per_call(lambda: by_state(nnx.split(model)[1], tok)),
      model_as_pytree_ms=ms_per_call(lambda: by_model(model, tok)),
      state_given_ms=ms_per_call(lambda: by_state(state, tok))))
  del model, state
print(f"host: {platform.processor() or platform.machine()}, JAX {jax.__version__}, backend "
      f"{jax.default_backend()}; ms per jitted call that ignores the parameters")
print("| size | leaves | nnx.split each call | model as pytree | state split once |")
print("|---|---|---|---|---|")
for r in rows:
  print(f"| {r['size']} | {r['leaves']} | {r['split_each_call_ms']:.2f} | "
        f"{r['model_as_pytree_ms']:.2f} | {r['state_given_ms']:.2f} |")
out = pathlib.Path(__file__).with_name("host_overhead.json")
out.write_text(json.dumps(dict(backend=jax.default_backend(), jax=jax.__version__, rows=rows),
                          indent=1) + "\n")
