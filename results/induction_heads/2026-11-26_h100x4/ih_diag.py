"""Evaluates a trained Induction Heads Mamba checkpoint at long lengths with several scan backends
and chunk sizes. Usage: python .kdev/ih_diag.py <out_dir> [min_log2 max_log2]"""
import dataclasses, sys, time, json
from pathlib import Path
import jax, optax
import orbax.checkpoint as ocp
from flax import nnx
from experiments import induction_heads as ih, models, train

out_dir = Path(sys.argv[1])
lo, hi = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (11, 17)
base = ih.PRESETS["paper"]
ckpt = (out_dir / "mamba_s6" / "checkpoints").absolute()
manager = ocp.CheckpointManager(ckpt)
step = manager.latest_step()
rows = []
import os
combos = [(b, int(c)) for b, c in (x.split(":") for x in os.environ.get(
    "DIAG", "pallas:8192,associative:8192,pallas:1024,sequential:8192").split(","))]
for backend, chunk in combos:
  preset = dataclasses.replace(base, shape=dataclasses.replace(base.shape, scan_backend=backend),
                               min_test_log2=lo, max_test_log2=hi, eval_chunk=chunk)
  model = models.make_model("mamba_s6", preset.shape, nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  from jax.sharding import NamedSharding, PartitionSpec as P
  sh = NamedSharding(train.data_mesh(), P())
  train._restore(manager, step, model, opt, jax.random.key(0), sh)
  t = time.perf_counter()
  acc = ih.accuracy_by_length(model, "mamba_s6", preset, 0)
  row = {"backend": backend, "chunk": chunk, "step": step, "seconds": time.perf_counter() - t,
         **{f"2^{k.bit_length() - 1}": round(100 * v, 2) for k, v in acc.items()}}
  print(json.dumps(row), flush=True)
  rows.append(row)
(out_dir / "diag.json").write_text(json.dumps(rows, indent=1))
