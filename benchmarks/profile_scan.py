"""Where a selective scan call spends its GPU time: every kernel of the call, per backend.

Runs the same compiled calls as ``benchmarks.bench_scan`` (bf16 inputs, z, D, Δ bias, softplus)
under the JAX profiler and lists each kernel's time per call: the scan kernels themselves and the
XLA fusions around them (layout changes, the sums of per-block partials, casts). Use it to see
what bounds a cell before changing a kernel; timings for claims come from ``bench_scan``.

  python -m benchmarks.profile_scan --shapes=130m-train --modes=fwdbwd --backends=pallas,jla \
      --configs='wg1:bwd_warpgroups=1'

The flags are ``bench_scan``'s (``--shapes``, ``--modes``, ``--backends``, ``--configs``,
``--tiny``), and ``--calls``. Off the GPU the lists are empty (only GPU kernels are read).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from absl import app, flags

import ssmax
from benchmarks import harness, trace
from benchmarks.bench_scan import build_call
from benchmarks.scan_inputs import SHAPES, make_inputs

# --shapes, --modes, --backends, --configs and the results flags are bench_scan's.
FLAGS = flags.FLAGS
flags.DEFINE_integer("calls", 10, "Calls traced per variant (times are per call).")


def profile(call, calls: int) -> list[dict]:
  """Kernels of ``calls`` back-to-back calls: name, launches and microseconds per call."""
  call()  # compiled and warm
  kernels, _ = trace.device_kernels(lambda: [call() for _ in range(calls)][-1])
  total = collections.defaultdict(float)
  count = collections.Counter()
  for k in kernels:
    name = trace.short_name(k.name)
    total[name] += k.duration_ns / 1e3 / calls
    count[name] += 1
  return [dict(kernel=name, launches=count[name] / calls, us=us)
          for name, us in sorted(total.items(), key=lambda x: -x[1])]


def main(argv):
  del argv
  dev = jax.devices()[0]
  run = harness.Run("profile_scan", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                    tag=FLAGS.tag, current=FLAGS.current,
                    meta=dict(device=dev.device_kind, calls=FLAGS.calls))
  if FLAGS.tiny:  # CPU smoke run: no GPU kernels to list, but every step runs
    FLAGS.shapes, FLAGS.calls = ["tiny"], 1
  variants = [(be, be, None) for be in FLAGS.backends]
  variants += [("pallas", f"pallas[{name}]", kv) for name, kv in harness.parse_configs(FLAGS.configs)]
  rows = run.record["rows"] = []
  lines = []
  for shape in FLAGS.shapes:
    kw = make_inputs(jax.random.PRNGKey(1), *SHAPES[shape], jnp.bfloat16)
    for backend, label, kv in variants:
      config = None if kv is None else ssmax.pallas.Config(**kv)
      for mode in FLAGS.modes:
        call, _, _ = build_call(backend, kw, mode, config)
        kernels = profile(call, FLAGS.calls)
        busy = sum(k["us"] for k in kernels)
        rows.append(dict(shape=shape, backend=label, mode=mode, busy_us=busy, kernels=kernels))
        run.log(f"{shape} {label} {mode}: {busy:.1f} us of kernels per call")
        for k in kernels:
          run.log(f"  {k['us']:9.1f} us  x{k['launches']:<4g} {k['kernel']}")
        lines += [f"| {shape} | {label} | {mode} | {k['kernel']} | {k['launches']:g} | "
                  f"{k['us']:.1f} |" for k in kernels]
        lines.append(f"| {shape} | {label} | {mode} | **all kernels** | | **{busy:.1f}** |")
  table = ("| shape | variant | mode | kernel | launches per call | µs per call |\n"
           "|---|---|---|---|---|---|\n" + "\n".join(lines))
  run.save(f"Kernels of one call, {dev.device_kind} (mean of {FLAGS.calls} calls under the JAX "
           f"profiler)\n\n{table}")
  run.finish()


if __name__ == "__main__":
  app.run(main)
