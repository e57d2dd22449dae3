"""Selective scan benchmark on the GPU: every backend, Mamba shapes, forward and forward+backward.

Times ``ssmax.selective_scan`` (the public call, layout handling included) for each backend at the
shapes of Mamba-130m and Mamba-1.4b training and a 32k-token sequence, all with bf16 inputs, z gate,
D skip, Δ bias and softplus. Reports the median time of many runs after warm-up, the peak device
memory of the compiled call (XLA's memory analysis: arguments + outputs + temporaries), and the
achieved bandwidth over the fewest bytes the call must move, against a measured device copy.
Before timing it checks, on the GPU, that the fused kernel agrees with ``lax.associative_scan``
(fp32 and bf16, outputs and every gradient) at small odd shapes and at the benchmark shapes, and
that two backward passes give bit-identical gradients.

Usage::

  python experiments/bench_scan.py --out=experiments/results/bench_scan_h100.json

``--backends=...,jla`` also times the Mosaic GPU Mamba-1 kernel of the ``jax-linear-attention``
package side by side, if it is installed (a comparison only, never a dependency of ssmax), and
records how far its output is from ssmax's.

``--variants`` additionally times blockings of the fused kernel through ``ssmax.pallas`` directly,
e.g. ``--variants='c8:chunk=8;c16:chunk=16,bwd_num_warps=8'``.
"""

from __future__ import annotations

import json
import math
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import ssmax.scan as scan_lib
from ssmax import pallas as ssmax_pallas

SHAPES = {  # (batch, length, d_inner, d_state)
    "130m-train": (8, 2048, 1536, 16),
    "1.4b-train": (4, 2048, 4096, 16),
    "long-32k": (1, 32768, 2048, 16),
}
# Official CUDA kernel on an H100 (../shared/anchors/official_cuda_h100.json), milliseconds.
OFFICIAL_MS = {"130m-train": (0.452, 2.279), "1.4b-train": (0.595, 3.041),
               "long-32k": (1.506, 7.261)}

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", list(SHAPES), "Shapes to time.")
flags.DEFINE_list("backends", ["pallas", "associative", "sequential"], "Backends to time.")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
flags.DEFINE_integer("iters", 30, "Timed measurements per cell (median reported).")
flags.DEFINE_integer("inner", 5, "Calls enqueued per measurement (the time is divided by it).")
flags.DEFINE_integer("slow_iters", 3, "Measurements for the sequential backend.")
flags.DEFINE_bool("check", True, "Run the GPU correctness pass first.")
flags.DEFINE_list("check_shapes", list(SHAPES), "Benchmark shapes included in the check.")
flags.DEFINE_integer("small_cases", 6, "How many of the small odd check cases to run.")
flags.DEFINE_list("check_dtypes", ["float32", "bfloat16"], "Dtypes of the check.")
flags.DEFINE_float("budget_s", 2.0, "Rough time budget for timing one cell.")
flags.DEFINE_string("variants", "", "';'-separated name:key=val,... kernel configs to time too.")
flags.DEFINE_list("variant_shapes", [], "Shapes for --variants (default: --shapes).")
flags.DEFINE_list("variant_modes", [], "Modes for --variants (default: --modes).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def make_inputs(key, b, l, d, n, dtype, groups=None, with_state=False):
  """Mamba-like inputs: Δ around softplus^-1 of [1e-3, 1e-1], S4D-real A."""
  ks = jax.random.split(key, 9)
  bc = (b, l, n) if groups is None else (b, l, groups, n)
  dt = jnp.exp(jax.random.uniform(ks[0], (d,)) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
  kw = dict(
      u=jax.random.normal(ks[1], (b, l, d), dtype),
      delta=(0.5 * jax.random.normal(ks[2], (b, l, d))).astype(dtype),
      A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
      B=jax.random.normal(ks[3], bc, dtype),
      C=jax.random.normal(ks[4], bc, dtype),
      D=jnp.ones((d,), jnp.float32),
      z=jax.random.normal(ks[5], (b, l, d), dtype),
      delta_bias=(dt + jnp.log(-jnp.expm1(-dt))).astype(jnp.float32),
      delta_softplus=True,
  )
  if with_state:
    kw["initial_state"] = jax.random.normal(ks[6], (b, d, n), jnp.float32)
  return kw


DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_case(name, kw, results, tol):
  """Pallas vs associative: y, last state, all gradients; determinism of the backward."""
  names = [k for k in DIFF_ARGS if k in kw]
  args = [kw[k] for k in names]
  static = {k: v for k, v in kw.items() if k not in names}
  outs = {}
  b, _, d = kw["u"].shape
  wy = jax.random.normal(jax.random.PRNGKey(7), kw["u"].shape, jnp.float32).astype(kw["u"].dtype)
  wl = jax.random.normal(jax.random.PRNGKey(8), (b, d, kw["A"].shape[1]), jnp.float32)
  for backend in ("pallas", "associative"):
    def run(*a, backend=backend):
      return scan_lib.selective_scan(**dict(zip(names, a)), **static, return_last_state=True,
                                     backend=backend)

    def fwd_bwd(*a, run=run):  # one compile: outputs and every gradient (last state's too)
      (y, last), vjp = jax.vjp(run, *a)
      return y, last, vjp((wy, wl))

    g = jax.jit(fwd_bwd)
    y, last, grads = g(*args)
    outs[backend] = (y, last, grads, g)
  yp, lp, gp, gfun = outs["pallas"]
  ya, la, ga, _ = outs["associative"]
  errs = {"y": rel(yp, ya), "last_state": rel(lp, la)}
  for k, a, b in zip(names, gp, ga):
    errs["d" + k] = rel(a, b)
  again = gfun(*args)[2]
  identical = all(bool(jnp.array_equal(a, b)) for a, b in zip(gp, again))
  worst = max(errs.values())
  ok = worst < tol and identical and all(np.isfinite(v) for v in errs.values())
  results.append(dict(case=name, errors=errs, worst=worst, tol=tol, bit_identical=identical, ok=ok))
  print(f"check {name:38s} worst rel err {worst:.2e} (tol {tol:.0e}) "
        f"bwd bit-identical {identical} -> {'OK' if ok else 'FAIL'}", flush=True)
  return ok


def correctness_pass(shapes):
  results = []
  key = jax.random.PRNGKey(0)
  small = [  # (b, l, d, n, groups, with_state)
      (2, 37, 5, 3, None, True), (1, 300, 6, 16, 3, True), (3, 129, 40, 7, 2, False),
      (2, 1000, 64, 16, None, True), (2, 65, 96, 1, 4, True), (1, 17, 33, 256, None, True)]
  tols = {"float32": 2e-4, "bfloat16": 2e-2}
  cases = [(f"{(b, l, d, n)} g={g} h0={st}", (b, l, d, n), g, st, i)
           for i, (b, l, d, n, g, st) in enumerate(small[:FLAGS.small_cases])]
  cases += [(s, SHAPES[s], None, False, 99) for s in shapes]
  for name, (b, l, d, n), g, st, seed in cases:
    for dname in FLAGS.check_dtypes:
      dtype = jnp.dtype(dname)
      # Long sums in fp32 differ by more than 2e-4 between two fp32 algorithms.
      tol = tols[dname] if seed != 99 or dname != "float32" else 1e-3
      kw = make_inputs(jax.random.fold_in(key, seed), b, l, d, n, dtype, groups=g, with_state=st)
      try:
        check_case(f"{name} {dname}", kw, results, tol)
      except Exception as e:  # a kernel that fails to compile is a failed check, not a crash
        msg = f"{type(e).__name__}: {e}"[:2000]
        results.append(dict(case=f"{name} {dname}", ok=False, error=msg))
        print(f"check {name} {dname} -> ERROR {msg}", flush=True)
  return results


def copy_bandwidth():
  x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
  f = jax.jit(lambda a: a * 1.0001)
  t = time_fn(lambda: f(x), iters=20, inner=5)
  return 2 * x.nbytes / (t * 1e-3) / 1e9


def time_fn(call, iters, inner, budget_s=None):
  """Median over `iters` of (time of `inner` back-to-back calls) / inner, in ms."""
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  one = time.perf_counter() - t0
  for _ in range(2):
    jax.block_until_ready(call())
  if budget_s is not None:  # fewer runs for slow cells
    inner = max(1, min(inner, int(budget_s / 10 / max(one, 1e-6))))
    iters = max(3, min(iters, int(budget_s / (inner * max(one, 1e-6)))))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = call()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner * 1e3)
  return statistics.median(samples)


def min_bytes(b, l, d, n, mode):
  """Fewest HBM bytes: bf16 u, Δ, z, B, C in and y out; backward adds dy in, du, dΔ, dz, dB, dC out."""
  act = b * l * d * 2
  bc = b * l * n * 2
  fwd = 3 * act + 2 * bc + act
  bwd = 4 * act + 2 * bc + 3 * act + 2 * bc
  return fwd if mode == "fwd" else fwd + bwd


def build_call(backend, kw, mode, config=None):
  names = [k for k in DIFF_ARGS if k in kw]
  args = [kw[k] for k in names]
  static = {k: v for k, v in kw.items() if k not in names}
  if backend == "jla":
    from jla.ops.mosaic_gpu.mamba1 import mamba1  # the peer kernel; its C, B, u order

    def run(*a):
      x = dict(zip(names, a))
      y, _ = mamba1(x["C"], x["B"], x["u"], x["delta"], x["A"], d=x["D"], z=x["z"],
                    dt_bias=x["delta_bias"], dt_softplus=static["delta_softplus"])
      return y
  elif config is None:
    def run(*a):
      return scan_lib.selective_scan(**dict(zip(names, a)), **static, backend=backend)
  else:
    def run(*a):
      x = scan_lib.check_inputs(**dict(zip(names, a)), **static)
      y, _ = ssmax_pallas.selective_scan(
          x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, x.initial_state,
          delta_softplus=x.delta_softplus, interpret=False, config=config)
      return y
  if mode == "fwd":
    fn = jax.jit(run)
  else:
    dy = jax.random.normal(jax.random.PRNGKey(3), kw["u"].shape, kw["u"].dtype)

    def fb(*a):
      y, vjp = jax.vjp(run, *a)
      return vjp(dy)

    fn = jax.jit(fb)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  return (lambda: compiled(*args)), peak, compile_s


def parse_variants(spec):
  out = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    name, _, body = item.partition(":")
    kv = {}
    for pair in filter(None, body.split(",")):
      k, v = pair.split("=")
      kv[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    out.append((name, ssmax_pallas.Config(**kv)))
  return out


def main(argv):
  del argv
  dev = jax.devices()[0]
  print("device:", dev.device_kind, "| jax", jax.__version__, flush=True)
  report = {"device": dev.device_kind, "jax": jax.__version__, "shapes": SHAPES,
            "official_ms": OFFICIAL_MS}
  bw = copy_bandwidth()
  report["copy_GBps"] = bw
  print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
  rows = []
  cells = [(s, be, None, None) for s in FLAGS.shapes for be in FLAGS.backends]
  for vname, cfg in parse_variants(FLAGS.variants):
    for s in (FLAGS.variant_shapes or FLAGS.shapes):
      cells.append((s, "pallas", vname, cfg))
  for shape, backend, vname, cfg in cells:
    b, l, d, n = SHAPES[shape]
    kw = make_inputs(jax.random.PRNGKey(1), b, l, d, n, jnp.bfloat16)
    modes = FLAGS.modes if vname is None else (FLAGS.variant_modes or FLAGS.modes)
    for mode in modes:
      label = backend if vname is None else f"pallas[{vname}]"
      try:
        call, peak, compile_s = build_call(backend, kw, mode, cfg)
        iters = FLAGS.slow_iters if backend == "sequential" else FLAGS.iters
        inner = 1 if backend == "sequential" else FLAGS.inner
        ms = time_fn(call, iters, inner, FLAGS.budget_s)
        err = None
        if backend == "jla" and mode == "fwd":  # same semantics as ours?
          ours = build_call("pallas", kw, "fwd")[0]()
          agree = rel(call(), ours)
          print(f"{shape}: jla vs ssmax pallas y rel err {agree:.2e}", flush=True)
      except Exception as e:  # report the failure in the table, keep going
        ms, peak, compile_s, err = float("nan"), None, float("nan"), f"{type(e).__name__}: {e}"[:300]
      gbps = min_bytes(b, l, d, n, mode) / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
      agrees = backend == "jla" and mode == "fwd" and err is None
      row = dict(shape=shape, backend=label, mode=mode, ms=ms, agree=agree if agrees else None,
                 peak_GiB=None if peak is None else peak / 2**30,
                 GBps=gbps, frac_copy=gbps / bw, compile_s=compile_s, error=err,
                 config=None if cfg is None else {k: v for k, v in vars(cfg).items() if v is not None})
      rows.append(row)
      print(f"{shape:11s} {label:22s} {mode:6s} {ms:9.3f} ms  peak "
            f"{(row['peak_GiB'] or float('nan')):6.2f} GiB  {gbps:7.0f} GB/s  "
            f"(compile {compile_s:.1f} s){'  ERROR ' + err if err else ''}", flush=True)
  report["rows"] = rows
  summary(rows, report)
  if FLAGS.check:
    t0 = time.perf_counter()
    res = correctness_pass(FLAGS.check_shapes)
    report["check"] = res
    report["check_ok"] = all(r["ok"] for r in res)
    print(f"correctness pass: {'OK' if report['check_ok'] else 'FAILED'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  summary(rows, report)


def summary(rows, report):
  # Summary table: pallas vs associative and official.
  print("\n| shape | backend | fwd ms | fwd+bwd ms | peak GiB (fwd+bwd) | GB/s fwd | x assoc fwd+bwd | x official fwd | x official fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|---|")
  get = lambda s, be, m: next((r for r in rows if r["shape"] == s and r["backend"] == be and r["mode"] == m), None)
  for s in FLAGS.shapes:
    assoc = get(s, "associative", "fwdbwd")
    for be in dict.fromkeys(r["backend"] for r in rows if r["shape"] == s):
      f, fb = get(s, be, "fwd"), get(s, be, "fwdbwd")
      fms = f["ms"] if f else float("nan")
      fbms = fb["ms"] if fb else float("nan")
      xa = assoc["ms"] / fbms if assoc and fb else float("nan")
      of, ofb = OFFICIAL_MS[s]
      pk = fb["peak_GiB"] if fb and fb["peak_GiB"] is not None else float("nan")
      gb = f["GBps"] if f else float("nan")
      print(f"| {s} | {be} | {fms:.3f} | {fbms:.3f} | {pk:.2f} | {gb:.0f} | {xa:.1f} | "
            f"{of / fms:.2f} | {ofb / fbms:.2f} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as fh:
      json.dump(report, fh, indent=1, default=str)
    print("wrote", FLAGS.out, flush=True)


if __name__ == "__main__":
  app.run(main)
