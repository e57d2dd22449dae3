"""What the Mosaic GPU kernels compile to, on a machine without a GPU: registers, shared memory,
CTAs per SM, and the instruction mix of each kernel's innermost loop, with the bound it implies
(how, and what the clocks mean: :mod:`benchmarks.sass`). Nothing runs; no timing comes from this.
What it gives is what a profiler's source view would: which pipe an inner loop leans on.

  python -m benchmarks.sass_report --shapes=130m-prefill,130m-train --modes=fwd,fwdbwd
  python -m benchmarks.sass_report --shapes=130m-prefill --modes=fwd --configs='u4:primal_unroll=4'

The first run downloads the toolchain (~140 MB) into ``--toolchain``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

from absl import app, flags

from benchmarks import bench_scan  # noqa: F401  (--shapes, --modes, --configs are bench_scan's)
from benchmarks import harness, sass
from benchmarks.scan_inputs import SHAPES as SCAN_SHAPES

SHAPES = dict(SCAN_SHAPES, **{"130m-prefill": (64, 2048, 1536, 16),
                              "1.4b-prefill": (64, 2048, 4096, 16)})
# --shapes (here also 130m-prefill and 1.4b-prefill: batch 64), --modes (fwd: the forward that
# saves nothing, as in a prefill; fwdbwd: training's kernels) and --configs are bench_scan's.
FLAGS = flags.FLAGS
flags.DEFINE_string("toolchain", str(pathlib.Path.home() / ".cache" / "ssmax-sass"),
                    "Where the CUDA plugin, nvdisasm and the stand-in driver are kept.")
flags.DEFINE_string("dump_dir", None, "Keep the PTX, ptxas reports and SASS here (default: a "
                    "temporary folder, deleted).")
flags.DEFINE_string("worker", None, "Internal: compile one variant (JSON) in this process.")

# ----------------------------------------------------------------------------------------------
# One variant, compiled in a worker process (the stand-in driver must be on its library path).


def lower_variant(v: dict) -> None:
  """Lowers the scan of variant ``v`` for cuda (bench_scan's inputs: bf16 u, Δ, z, B, C; float32
  A, D, Δ bias; softplus); its Mosaic GPU modules land in ``core.KNOWN_KERNELS``. The kernel is
  called directly: through ``ssmax.selective_scan`` a CPU process would pick its interpreter,
  which does not lower for cuda."""
  import jax
  import jax.numpy as jnp

  from ssmax import pallas

  b, l, d, n = v["shape"]
  s, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  config = pallas.Config(**v.get("config", {}))

  def f(u, dt, A, B, C, D, z, bias):
    return pallas.selective_scan(u, dt, A, B, C, D, z, bias, None, delta_softplus=True,
                                 config=config)[0]

  args = (s((b, l, d), bf), s((b, l, d), bf), s((d, n), f32), s((b, l, 1, n), bf),
          s((b, l, 1, n), bf), s((d,), f32), s((b, l, d), bf), s((d,), f32))
  if v["mode"] == "fwdbwd":
    g = f
    f = lambda *a: jax.vjp(g, *a)[1](jnp.ones((b, l, d), bf))
  jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def worker(spec: str) -> None:
  v = json.loads(spec)
  lower_variant(v)
  sass.compile_known_kernels(v["plugin"])


def compile_variant(v: dict, tools: dict, dump: pathlib.Path) -> None:
  dump.mkdir(parents=True, exist_ok=True)
  harness.run_worker("benchmarks.sass_report", dict(v, plugin=str(tools["plugin"])),
                     sass.compile_env(tools, dump))


# ----------------------------------------------------------------------------------------------


def variants() -> list[dict]:
  out = []
  configs = [("default", {})] + harness.parse_configs(FLAGS.configs)
  harness.check_choices("shapes", FLAGS.shapes, SHAPES)
  harness.check_choices("modes", FLAGS.modes, ("fwd", "fwdbwd"))
  return [dict(shape=SHAPES[shape], shape_name=shape, mode=mode, config=kv, config_name=name)
          for shape in FLAGS.shapes for mode in FLAGS.modes for name, kv in configs]


def table(rows: list[dict]) -> str:
  """One line per innermost loop of every kernel (a kernel without one: one line)."""
  lines = ["| kernel | shape, mode, config | regs | spills | smem KiB | CTAs/SM (by) | loop: instr "
           "| MUFU | FMA pipe | LDS | clocks issue / MUFU / FMA | bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for k in r["kernels"]:
      head = (f"| {k['kernel']} | {r['shape_name']} {r['mode']} {r['config_name']} | "
              f"{k['registers']} | {k['spill_bytes']} | {k['smem_bytes'] / 1024:.0f} | "
              f"{k['ctas_per_sm']} ({k['limited_by']}) |")
      if not k["loops"]:
        lines.append(head + " - | - | - | - | - | - |")
      for i, loop in enumerate(k["loops"]):
        o, c = loop["opcodes"], loop["clocks"]
        lines.append((head if i == 0 else "| | | | | | |") +
                     f" {i + 1}: {loop['instructions']} | {o.get('MUFU', 0)} | "
                     f"{sum(o.get(x, 0) for x in sass.FMA_PIPE)} | {o.get('LDS', 0)} | "
                     f"{c['issue']} / {c['mufu']} / {c['fma']} | {loop['bound']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  tools = sass.toolchain(pathlib.Path(FLAGS.toolchain).expanduser())
  run = harness.Run("sass_report", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                    tag=FLAGS.tag, current=FLAGS.current, device="sm90-offline",
                    meta=dict(device="sm_90a, compiled offline (no GPU)"))
  rows = run.record["rows"] = []
  dumps = pathlib.Path(FLAGS.dump_dir or tempfile.mkdtemp(prefix="sass_report_"))
  for v in variants():
    name = f"{v['shape_name']}_{v['mode']}_{v['config_name']}"
    dump = dumps / name
    compile_variant(v, tools, dump)
    kernels = [sass.kernel_report(p, tools) for p in sorted(dump.glob("*.ptx"))]
    rows.append(dict(v, kernels=kernels))
    for k in kernels:
      loop = k["loops"][0] if k["loops"] else {}
      run.log(f"{name} {k['kernel']}: {k['registers']} regs, {k['spill_bytes']} B spilled, "
              f"{k['smem_bytes']} B smem, {k['ctas_per_sm']} CTAs/SM ({k['limited_by']}); "
              f"inner loop {loop.get('instructions')} instr, clocks {loop.get('clocks')}")
    run.save(table(rows))
  run.log("\n" + table(rows))
  if FLAGS.dump_dir is None:
    shutil.rmtree(dumps)
  run.finish("Compiled offline for sm_90a (no GPU; a stand-in driver answers the compiler's "
             "questions). Static counts, not timings: see the module docstring of "
             "benchmarks/sass.py.")


if __name__ == "__main__":
  app.run(main)
