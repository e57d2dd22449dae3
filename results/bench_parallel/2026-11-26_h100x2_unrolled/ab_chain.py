"""A/B: the segment chains as XLA while loops (old) against unrolled (new), 1 and 2 GPUs."""
import json, sys, types, functools
import jax, jax.numpy as jnp
from jax import lax
import ssmax
from ssmax import parallel, sharding
from ssmax.pallas import selective_scan_mosaic as ssm
from benchmarks import harness
from benchmarks.bench_parallel import scan_inputs

def looped_lax():
  ns = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax) if not k.startswith("__")})
  def scan(*a, unroll=None, **k):
    return lax.scan(*a, **k)
  ns.scan = scan
  return ns

def row(shape, devices, variant):
  ssm.lax = looped_lax() if variant == "loop" else lax
  sharding.lax = looped_lax() if variant == "loop" else lax
  arrays = {k: v for k, v in scan_inputs(shape, jnp.bfloat16).items() if k != "delta_softplus"}
  mesh = parallel.make_mesh(1, devices)
  if devices == 1:
    scan = lambda a: ssmax.selective_scan(**a, delta_softplus=True, backend="pallas")
  else:
    scan = lambda a: parallel.selective_scan(mesh, **a, delta_softplus=True, backend="pallas")
  fwd = jax.jit(scan)
  fb = jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(jnp.float32))))
  placed = arrays
  if devices > 1:
    placed = dict(parallel.shard_batch(mesh, {k: arrays[k] for k in ("u", "delta", "B", "C", "z")}, data_axis=None),
                  **parallel.replicate(mesh, {k: arrays[k] for k in ("A", "D", "delta_bias")}))
  out = dict(shape=shape, devices=devices, variant=variant,
             fwd_ms=1e3 * harness.median_seconds(lambda: fwd(placed), repeats=20, inner=5),
             fwd_bwd_ms=1e3 * harness.median_seconds(lambda: fb(placed), repeats=20, inner=5))
  jax.clear_caches()
  return out

rows = []
shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
for shape in shapes:
  for devices in (1, 2):
    for variant in ("loop", "unrolled"):
      r = row(shape, devices, variant)
      print(json.dumps(r), flush=True)
      rows.append(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
