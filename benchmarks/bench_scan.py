"""Selective scan benchmark on the GPU: every backend, Mamba shapes, forward and forward+backward.

Times ``ssmax.selective_scan`` (the public call, layout handling included) for each backend at the
shapes of Mamba-130m and Mamba-1.4b training and a 32k-token sequence, all with bf16 inputs, z gate,
D skip, Δ bias and softplus. Reports the median time of many runs after warm-up, the peak device
memory of the compiled call (XLA's memory analysis: arguments + outputs + temporaries), and the
achieved bandwidth over the fewest bytes the call must move, against a measured device copy.
The kernel's GPU correctness check is a test: ``pytest -m gpu tests/kernels/test_scan_gpu.py``.

Usage::

  python -m benchmarks.bench_scan --backends=pallas,associative,sequential

``--backends=...,jla`` also times the Mosaic GPU Mamba-1 kernel of the ``jax-linear-attention``
package side by side, if it is installed (a comparison only, never a dependency of ssmax), and
records how far its output is from ssmax's.

``--packed`` adds rows ``<backend>+segments`` for ssmax's backends: the same inputs with
``segment_ids`` of long-tailed document lengths (``scan_inputs.packed_segment_ids``, mean ~256
tokens), to compare the scan of packed documents with the plain one. Rows timed one after the
other drift with the GPU's speed (rows timing the same kernel differed by up to 9%): ``--rounds``
repeats every cell in alternating order, and ``--paired=N`` (instead) times the plain and the packed
call alternately, N measurements each, and reports the median ratio of neighbouring measurements.

``--configs`` additionally times blockings of the fused kernel through ``ssmax.pallas`` directly:
each ``name:key=value,...`` goes to ``ssmax.pallas.Config(key=value, ...)`` as given, e.g.
``--configs='s8:segments=8;rt:reset_tiles=true'``; with ``--packed`` each also gets a
``pallas[name]+segments`` row.

Writes ``results/bench_scan/<date>_<device>/bench_scan.{json,md,log}`` (see :mod:`benchmarks.harness`).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import ssmax
from benchmarks import harness
from benchmarks.scan_inputs import OFFICIAL_MS, SHAPES, make_inputs, packed_segment_ids, split
from experiments import plotting

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU smoke run: the tiny shape, 2 measurements of 1 call.")
flags.DEFINE_list("shapes", [s for s in SHAPES if s != "tiny"], f"Shapes to time, from "
                  f"{list(SHAPES)}.")
flags.DEFINE_list("backends", ["pallas", "associative", "sequential"],
                  "Backends to time: ssmax's, and jla (the peer kernel, if installed).")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
flags.DEFINE_integer("iters", 30, "Timed measurements per cell (median reported).")
flags.DEFINE_integer("inner", 5, "Calls enqueued per measurement (the time is divided by it).")
flags.DEFINE_integer("slow_iters", 3, "Measurements for the sequential backend.")
flags.DEFINE_float("budget_s", 2.0, "Rough time budget for timing one cell.")
flags.DEFINE_bool("packed", False, "Also time ssmax's backends with segment_ids (packed "
                  "documents of long-tailed lengths), as rows '<backend>+segments'.")
flags.DEFINE_string("configs", "", "';'-separated name:key=value,... of ssmax.pallas.Config to "
                    "time too.")
flags.DEFINE_list("config_shapes", [], "Shapes for --configs (default: --shapes).")
flags.DEFINE_list("config_modes", [], "Modes for --configs (default: --modes).")
flags.DEFINE_integer("paired", 0, "With --packed: instead of the table's cells, time each ssmax "
                     "backend (and --configs blocking) without and with segment_ids alternately, "
                     "this many measurements each, and report the median of the pairs' ratios "
                     "(harness.paired_seconds; 0: no).")
flags.DEFINE_integer("rounds", 1, "Time every cell this many times, the cell order reversed in "
                     "every other round (so drift in the GPU's speed does not favour the rows timed "
                     "first); the table gives each cell's median over rounds, and with --packed the "
                     "ratio of segments to plain in every round.")
flags.DEFINE_string("official_json", "", "official_scan.json written on the same machine by "
                    "../shared/anchors/official_scan_bench.py (with peak memory: "
                    "benchmarks/official_scan_memory.py): its times join the table as "
                    "official-cuda rows and the x official columns use them instead of the "
                    "H100 anchor.")
flags.DEFINE_string("report", "", "Time nothing: re-summarise this bench_scan.json (with "
                    "--official_json merged) into --out_dir (default: over the report).")
harness.define_flags(flags)


def copy_bandwidth(elements: int = 1 << 29) -> float:
  """GB/s of a bf16 read + write on the device (default 1 GiB)."""
  x = jnp.ones((elements,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 1.0001)
  s = harness.median_seconds(lambda: f(x), repeats=20, inner=5, warmup=3)
  return 2 * x.nbytes / s / 1e9


def min_bytes(b, l, d, n, mode):
  """Fewest HBM bytes: bf16 u, Δ, z, B, C in and y out; backward adds dy in, du, dΔ, dz, dB, dC out."""
  act = b * l * d * 2
  bc = b * l * n * 2
  fwd = 3 * act + 2 * bc + act
  bwd = 4 * act + 2 * bc + 3 * act + 2 * bc
  return fwd if mode == "fwd" else fwd + bwd


def scan_fn(backend, names, static, config=None):
  """``(*arrays) -> y`` through ``backend``: ssmax's public call, the pallas kernel with ``config``,
  or jla's kernel."""
  if backend == "jla":
    from jla.ops.mosaic_gpu.mamba1 import mamba1  # the peer kernel; its C, B, u order

    def run(*a):
      x = dict(zip(names, a))
      y, _ = mamba1(x["C"], x["B"], x["u"], x["delta"], x["A"], d=x["D"], z=x["z"],
                    dt_bias=x["delta_bias"], dt_softplus=static["delta_softplus"])
      return y
  elif config is None:
    def run(*a):
      return ssmax.selective_scan(**dict(zip(names, a)), **static, backend=backend)
  else:
    def run(*a):
      x = dict(zip(names, a))
      groups = lambda m: m[:, :, None] if m.ndim == 3 else m  # the kernel's (b, l, g, n)
      y, _ = ssmax.pallas.selective_scan(
          x["u"], x["delta"], x["A"], groups(x["B"]), groups(x["C"]), x.get("D"), x.get("z"),
          x.get("delta_bias"), x.get("initial_state"), delta_softplus=static["delta_softplus"],
          segment_ids=x.get("segment_ids"), config=config,
          interpret=jax.default_backend() != "gpu")
      return y
  return run


def build_call(backend, kw, mode, config=None):
  """The compiled call: ``(call, peak bytes, compile seconds)``."""
  names, args, static = split(kw)
  run = scan_fn(backend, names, static, config)
  if mode == "fwd":
    fn = jax.jit(run)
  else:
    dy = jax.random.normal(jax.random.PRNGKey(3), kw["u"].shape, kw["u"].dtype)
    fn = jax.jit(lambda *a: jax.vjp(run, *a)[1](dy))
  compiled, compile_s = harness.compile_timed(fn, *args)
  return (lambda: compiled(*args)), harness.compiled_peak_bytes(compiled), compile_s


def measure(shape, backend, mode, kw, config_kv=None, compiled=None) -> dict:
  """One cell: ``backend`` at ``shape`` in ``mode``; ``config_kv`` given, the pallas kernel with
  ``ssmax.pallas.Config(**config_kv)``. ``compiled``: :func:`build_call`'s result, if built
  already (a later round)."""
  b, l, d, n = SHAPES[shape]
  config = None if config_kv is None else ssmax.pallas.Config(**config_kv)
  call, peak, compile_s = compiled or build_call(backend, kw, mode, config)
  slow = backend == "sequential"
  seconds = harness.median_seconds(call, repeats=FLAGS.slow_iters if slow else FLAGS.iters,
                                   inner=1 if slow else FLAGS.inner, budget_s=FLAGS.budget_s,
                                   warmup=3)
  out = dict(ms=1e3 * seconds, peak_GiB=None if peak is None else peak / 2**30,
             GBps=min_bytes(b, l, d, n, mode) / seconds / 1e9, compile_s=compile_s)
  if backend == "jla" and mode == "fwd":  # same semantics as ours?
    out["agree"] = harness.rel_err(call(), build_call("pallas", kw, "fwd")[0]())
  return out


def add_official(report: dict, path: str) -> None:
  """The official kernel's times (and peak memory, where measured) from ``path`` as
  ``official-cuda`` rows of ``report``, measured on ``report``'s device or said otherwise."""
  off = json.loads(pathlib.Path(path).read_text())
  if off.get("device") and off["device"] != report.get("device"):
    raise app.UsageError(f"--official_json was measured on {off['device']}, this report on "
                         f"{report.get('device')}: compare only runs on one machine")
  report["official"] = dict(path=str(path), device=off.get("device"))
  report["rows"] = [r for r in report["rows"] if r["backend"] != "official-cuda"]
  for key, v in off.items():
    if not key.endswith("/mamba-cuda"):
      continue
    shape = key.split("/")[0]
    peak = v.get("peak_fwdbwd_MiB")
    for mode, ms in (("fwd", v["fwd_ms"]), ("fwdbwd", v["fwdbwd_ms"])):
      report["rows"].append(dict(
          shape=shape, backend="official-cuda", mode=mode, ms=ms, error=None, status="ok",
          peak_GiB=None if (peak is None or mode == "fwd") else peak / 1024,
          GBps=min_bytes(*SHAPES[shape], mode) / (ms * 1e-3) / 1e9))


def main(argv):
  del argv
  if FLAGS.report:
    report = json.loads(pathlib.Path(FLAGS.report).read_text())
    if FLAGS.official_json:
      add_official(report, FLAGS.official_json)
    out = pathlib.Path(FLAGS.out_dir or pathlib.Path(FLAGS.report).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scan.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "bench_scan.md").write_text(summary(report) + "\n")
    print(summary(report))
    return
  dev = jax.devices()[0]
  bench = harness.Run("bench_scan", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current,
                      meta=dict(device=dev.device_kind, shapes=SHAPES, official_ms=OFFICIAL_MS))
  report = bench.record
  bench.log(f"device: {dev.device_kind} | jax {jax.__version__}")
  if FLAGS.tiny:
    FLAGS.shapes, FLAGS.iters, FLAGS.inner, FLAGS.slow_iters = ["tiny"], 2, 1, 2
  report["copy_GBps"] = bw = copy_bandwidth(1 << 20 if FLAGS.tiny else 1 << 29)
  bench.log(f"copy bandwidth {bw:.0f} GB/s (read + write)")
  rows = report["rows"] = []
  cells = [(s, be, be, None, FLAGS.modes) for s in FLAGS.shapes for be in FLAGS.backends]
  if FLAGS.packed:
    cells += [(s, be, f"{be}+segments", None, FLAGS.modes) for s in FLAGS.shapes
              for be in FLAGS.backends if be != "jla"]
  for name, kv in harness.parse_configs(FLAGS.configs):  # with --packed: with segment_ids too
    cells += [(s, "pallas", f"pallas[{name}]{seg}", kv, FLAGS.config_modes or FLAGS.modes)
              for s in (FLAGS.config_shapes or FLAGS.shapes)
              for seg in ([""] + (["+segments"] if FLAGS.packed else []))]
  if FLAGS.rounds < 1:
    raise app.UsageError(f"--rounds must be >= 1; got {FLAGS.rounds}")
  if FLAGS.paired < 0 or (FLAGS.paired and not FLAGS.packed):
    raise app.UsageError(f"--paired needs --packed (it times the plain and the packed call) and "
                         f"a count >= 0; got --paired={FLAGS.paired}, --packed={FLAGS.packed}")
  built = {}  # with several rounds: each cell's compiled call, kept for the next rounds
  for r in range(0 if FLAGS.paired else FLAGS.rounds):
    for shape, backend, label, kv, modes in (cells if r % 2 == 0 else cells[::-1]):
      kw = make_inputs(jax.random.PRNGKey(1), *SHAPES[shape], jnp.bfloat16)
      if label.endswith("+segments"):
        kw["segment_ids"] = packed_segment_ids(jax.random.PRNGKey(2), *SHAPES[shape][:2])
      for mode in (modes if r % 2 == 0 else modes[::-1]):
        cell = (shape, label, mode)
        if FLAGS.rounds > 1 and cell not in built:
          config = None if kv is None else ssmax.pallas.Config(**kv)
          built[cell] = harness.attempt(
              lambda: {"call": build_call(backend, kw, mode, config)}, bench.log).get("call")
        got = harness.attempt(lambda: measure(shape, backend, mode, kw, kv, built.get(cell)),
                              bench.log)
        row = {**dict(shape=shape, backend=label, mode=mode, ms=float("nan"), peak_GiB=None,
                      GBps=float("nan"), compile_s=float("nan"), agree=None, config=kv,
                      round=r), **got}
        row["frac_copy"] = row["GBps"] / bw
        row["error"] = None if row["status"] == "ok" else row["status"]
        rows.append(row)
        bench.log(f"{shape:11s} {label:22s} {mode:6s} {row['ms']:9.3f} ms  peak "
                  f"{(row['peak_GiB'] or float('nan')):6.2f} GiB  {row['GBps']:7.0f} GB/s  "
                  f"(compile {row['compile_s']:.1f} s)"
                  + (f"  round {r + 1}" if FLAGS.rounds > 1 else "")
                  + (f"  {row['status']}" if row["error"] else "")
                  + (f"  jla vs ssmax pallas y rel err {row['agree']:.2e}" if row["agree"] else ""))
        bench.save(summary(report))
  if FLAGS.paired:
    report["paired"] = paired(bench)
    bench.save(summary(report))
  if FLAGS.official_json:
    add_official(report, FLAGS.official_json)
    bench.save(summary(report))
  bench.log("\n" + summary(report))
  bench.finish()


def paired(bench) -> list[dict]:
  """Each ssmax backend (and each --configs blocking) at each shape and mode without and with
  segment_ids, timed alternately."""
  out = []
  for shape in FLAGS.shapes:
    kw = make_inputs(jax.random.PRNGKey(1), *SHAPES[shape], jnp.bfloat16)
    kw_seg = {**kw, "segment_ids": packed_segment_ids(jax.random.PRNGKey(2), *SHAPES[shape][:2])}
    variants = [(be, be, None) for be in FLAGS.backends if be not in ("jla", "sequential")]
    variants += [(f"pallas[{name}]", "pallas", ssmax.pallas.Config(**kv))
                 for name, kv in harness.parse_configs(FLAGS.configs)]
    for label, backend, config in variants:
      for mode in FLAGS.modes:
        def run():
          plain = build_call(backend, kw, mode, config)[0]
          seg = build_call(backend, kw_seg, mode, config)[0]
          return harness.paired_seconds(plain, seg, repeats=FLAGS.paired, warmup=3,
                                        inner=FLAGS.inner)
        got = harness.attempt(run, bench.log)
        out.append({"shape": shape, "backend": label, "mode": mode, **got})
        if got["status"] == "ok":
          bench.log(f"paired {shape:11s} {label:12s} {mode:6s} plain {1e3 * got['a']:.3f} ms, "
                    f"segments {1e3 * got['b']:.3f} ms, ratio {got['ratio']:.3f} "
                    f"[{got['ratio_q25']:.3f}, {got['ratio_q75']:.3f}]")
  return out


def summary(report) -> str:
  """Per shape and backend: times (the median over rounds), peak, bandwidth, and the ratios to
  associative and official; with packed rows, segments over plain in each round."""
  rows = report["rows"]
  nan = float("nan")

  def get(s, be, m):
    hits = [r for r in rows if (r["shape"], r["backend"], r["mode"]) == (s, be, m)]
    if not hits:
      return None
    ok = [r["ms"] for r in hits if r["error"] is None]
    return {**hits[0], "ms": float(np.median(ok)) if ok else nan,
            "GBps": float(np.median([r["GBps"] for r in hits if r["error"] is None])) if ok else nan}

  body = []
  same_run = "official" in report
  for s in dict.fromkeys(r["shape"] for r in rows):
    assoc = get(s, "associative", "fwdbwd")
    for be in dict.fromkeys(r["backend"] for r in rows if r["shape"] == s):
      f, fb = get(s, be, "fwd"), get(s, be, "fwdbwd")
      fms, fbms = (f["ms"] if f else nan), (fb["ms"] if fb else nan)
      if same_run:
        of, ofb = ((get(s, "official-cuda", m) or {"ms": nan})["ms"] for m in ("fwd", "fwdbwd"))
      else:
        of, ofb = OFFICIAL_MS.get(s, (nan, nan))
      pk = fb["peak_GiB"] if fb and fb["peak_GiB"] is not None else nan
      body.append([s, be, f"{fms:.3f}", f"{fbms:.3f}", f"{pk:.2f}",
                   f"{f['GBps'] if f else nan:.0f}",
                   f"{assoc['ms'] / fbms if assoc else nan:.1f}", f"{of / fms:.2f}",
                   f"{ofb / fbms:.2f}"])
  rounds = 1 + max((r.get("round", 0) for r in rows), default=0)
  official = (f"x official: the official CUDA kernel timed on the same machine "
              f"({report['official']['device']}, official-cuda rows; its peak is PyTorch's "
              f"max_memory_allocated)" if same_run else
              "x official: the official CUDA kernel's H100 anchor times (not this machine)")
  text = (f"Selective scan, bf16 inputs, z, D, Δ bias, softplus; {report['device']}, JAX "
          f"{report['jax']}" + (f"; median of {rounds} rounds" if rounds > 1 else "") + ". "
          + official + ".\n\n"
          + plotting.markdown_table(
              ["shape", "backend", "fwd ms", "fwd+bwd ms", "peak GiB (fwd+bwd)", "GB/s fwd",
               "x assoc fwd+bwd", "x official fwd", "x official fwd+bwd"], body))
  ratios = []
  for r in rows:
    if r["backend"].endswith("+segments") and r["error"] is None:
      plain = next((p for p in rows if (p["shape"], p["backend"], p["mode"], p.get("round", 0))
                    == (r["shape"], r["backend"][:-len("+segments")], r["mode"],
                        r.get("round", 0)) and p["error"] is None), None)
      if plain is not None:
        ratios.append([r["shape"], plain["backend"], r["mode"], r.get("round", 0) + 1,
                       f"{plain['ms']:.3f}", f"{r['ms']:.3f}", f"{r['ms'] / plain['ms']:.3f}"])
  if ratios:
    text += ("\n\nWith segment_ids over without, per round:\n\n" + plotting.markdown_table(
        ["shape", "backend", "mode", "round", "plain ms", "segments ms", "ratio"], ratios))
  pairs = [r for r in report.get("paired", []) if r["status"] == "ok"]
  if pairs:
    text += (f"\n\nWithout and with segment_ids timed alternately ({FLAGS.paired} measurements "
             "each; ratio: median of the pairs' ratios, with its quartiles):\n\n"
             + plotting.markdown_table(
                 ["shape", "backend", "mode", "plain ms", "segments ms", "ratio", "quartiles"],
                 [[r["shape"], r["backend"], r["mode"], f"{1e3 * r['a']:.3f}",
                   f"{1e3 * r['b']:.3f}", f"{r['ratio']:.3f}",
                   f"{r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}"] for r in pairs]))
  return text


if __name__ == "__main__":
  app.run(main)
