"""Training-step throughput and peak memory of the ~130M Mamba LM, one row per scan backend.

The setting of the official stack's measurement on an H100 (``ANCHORS``): the 130M model (d_model
768, 24 layers, vocabulary 50277 padded to 50280), sequences of 2048 tokens, next-token
cross-entropy, AdamW with float32 master weights and bfloat16 compute (``MambaConfig(dtype=
bfloat16, param_dtype=float32)``), random tokens. One step is one jit-compiled call (forward,
backward, optimizer update, model and optimizer state donated); the median over ``--steps`` calls
after ``--warmup`` calls is reported as milliseconds and ``batch * length`` tokens per second.

Peak memory: ``device peak`` is the device allocator's high-water mark (``memory_stats()``,
GPU only), taken in a fresh process per configuration (``--isolate``) so that it belongs to that
configuration alone; ``compiled peak`` is XLA's own estimate for the compiled step
(``memory_analysis()``), available on every platform.

Writes ``results/bench_train/<date>_<device>/bench_train.{md,json,log}`` (see
:mod:`benchmarks.harness`). A configuration that runs out of memory is reported
as OOM.

  python -m benchmarks.bench_train                       # GPU: batch 8 and 16, every backend
  python -m benchmarks.bench_train --tiny                # CPU smoke run in seconds
  python -m benchmarks.bench_train --packing=plain,packed --backends=pallas

``--packing=packed`` trains on rows of packed documents: ``segment_ids`` of long-tailed lengths
(``benchmarks.scan_inputs.packed_segment_ids``, mean ~256 tokens, or a quarter of a shorter
row) go to the model, so the scan and
the depthwise convolution restart at each document; tokens/s is then comparable with ``plain``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import harness
from benchmarks.lm_sizes import SIZES, train_state, train_step_fn, vocab_size
from benchmarks.scan_inputs import packed_segment_ids
from experiments import plotting
from ssmax import BACKENDS

# The official stack (mamba_ssm, fused CUDA/Triton path) on an NVIDIA H100 80GB, 2026-11-22: 130M,
# length 2048, bf16 autocast, AdamW, fp32 master weights. batch -> (ms/step, tokens/s, peak GiB).
ANCHORS = {8: (115.04, 142422, 17.76), 16: (213.66, 153365, 33.73)}

GIB = 2**30

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU smoke run: tiny model, length 16, batch 2, 3 steps.")
flags.DEFINE_enum("size", "130m", list(SIZES), "Model shape.")
flags.DEFINE_list("backends", None, "Scan backends to time; default: sequential, associative, "
                  "pallas (with --tiny not pallas: its CPU interpret mode compiles slowly).")
flags.DEFINE_list("batches", ["8", "16"], "Batch sizes.")
flags.DEFINE_integer("length", 2048, "Tokens per sequence.")
flags.DEFINE_list("packing", ["plain"], "plain (one sequence per row) and/or packed (documents "
                  "of long-tailed lengths per row, with segment_ids).")
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one compiles).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params float32).")
flags.DEFINE_float("learning_rate", 3e-4, "AdamW learning rate.")
flags.DEFINE_bool("isolate", None, "Run every configuration in its own process, so that the device "
                  "peak is its own; default: on unless --tiny.")
flags.DEFINE_float("max_minutes", None, "Start no new configuration after this many minutes.")
flags.DEFINE_string("child", None, "Internal: run one configuration given as JSON, write its row "
                    "to --out_dir/row.json.")
harness.define_flags(flags)


def measure(*, size, backend, batch, length, steps, warmup, dtype, learning_rate,
            packing="plain") -> dict:
  """Times one configuration in this process; returns its row (status "ok", "OOM" or "error")."""
  row = dict(size=size, backend=backend, batch=batch, length=length, dtype=dtype,
             packing=packing, device=str(jax.devices()[0].device_kind),
             platform=jax.default_backend())

  def timed() -> dict:
    graphdef, state, params = train_state(size, dtype=jnp.dtype(dtype),
                                          learning_rate=learning_rate, scan_backend=backend)
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, vocab_size(size))
    seg = (packed_segment_ids(jax.random.key(2), batch, length + 1, min(256.0, length / 4))
           if packing == "packed" else None)
    compiled, compile_s = harness.compile_timed(train_step_fn(graphdef), state, tokens, seg)
    peak = harness.compiled_peak_bytes(compiled)
    carry, losses = [state], []

    def step():  # the state is donated: each step takes the previous one's
      loss, carry[0] = compiled(carry[0], tokens, seg)
      losses.append(loss)
      return loss

    seconds = harness.median_seconds(step, repeats=steps, warmup=warmup)
    losses = [float(l) for l in losses]
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(f"non-finite loss with backend {backend}: {losses}")
    return dict(params=params, compile_s=compile_s,
                compiled_peak_gib=None if peak is None else peak / GIB,
                ms=1e3 * seconds, tokens_per_s=batch * length / seconds,
                first_loss=losses[0], last_loss=losses[-1])

  row.update(ms=None, tokens_per_s=None)
  row.update(harness.attempt(timed))
  peak = harness.device_peak_bytes()
  row["device_peak_gib"] = None if peak is None else peak / GIB
  return row


def measure_isolated(**kw) -> dict:
  """:func:`measure` in a fresh Python process (its own device allocator and peak)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "row.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_train", f"--child={json.dumps(kw)}",
           f"--out_dir={tmp}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and out.is_file():
      return json.loads(out.read_text())
  # Keep the sweep going; the row says what broke.
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return dict(size=kw["size"], backend=kw["backend"], batch=kw["batch"], length=kw["length"],
              dtype=kw["dtype"], packing=kw.get("packing", "plain"), status=f"error (exit {proc.returncode}): "
              + (lines[-1][:300] if lines else ""), ms=None, tokens_per_s=None,
              stderr_tail=proc.stderr[-4000:])


def run(bench: harness.Run, *, size, backends, batches, length, steps, warmup, dtype,
        learning_rate, isolate, max_minutes=None, packings=("plain",)) -> dict:
  """Measures every (batch, backend, packing) into ``bench.record`` and returns it; the run's files are
  rewritten after every configuration."""
  deadline = harness.Deadline(max_minutes)
  rows = []
  result = bench.record
  # With isolate, this process never touches the device (JAX would preallocate its memory and
  # starve the children); the device is named by the rows.
  result.update(device=None, platform=None, size=size, length=length, dtype=dtype, steps=steps,
                isolate=isolate, rows=rows,
                anchors={str(b): dict(ms=a[0], tokens_per_s=a[1], peak_gib=a[2])
                         for b, a in ANCHORS.items()})
  for batch, backend, packing in [(b, be, pk) for b in batches for be in backends
                                  for pk in packings]:
    kw = dict(size=size, backend=backend, batch=batch, length=length, steps=steps,
              warmup=warmup, dtype=dtype, learning_rate=learning_rate, packing=packing)
    if deadline.passed():
      row = dict(size=size, backend=backend, batch=batch, length=length, dtype=dtype,
                 packing=packing, status="not run (time budget)", ms=None, tokens_per_s=None)
    else:
      row = measure_isolated(**kw) if isolate else measure(**kw)
    rows.append(row)
    if result["device"] is None and "device" in row:
      result.update(device=row["device"], platform=row["platform"])
    bench.save(tables(result))
    bench.log(f"{backend:<12} batch {batch:>3} {packing:<6}: " + (
        f"{row['ms']:9.1f} ms {row['tokens_per_s']:10.0f} tok/s (compiled in "
        f"{row['compile_s']:.1f} s)" if row["status"] == "ok" else row["status"]))
    if row.get("stderr_tail"):
      bench.log(row["stderr_tail"])
  bench.log("\n" + tables(result) + f"\n\nwrote {bench.dir}")
  return result


def tables(result) -> str:
  fmt = lambda v, spec: "—" if v is None else format(v, spec)
  head = ["backend", "batch", "rows", "ms/step", "tokens/s", "device peak GiB", "compiled peak GiB",
          "vs official tokens/s"]
  body = []
  for r in result["rows"]:
    anchor = ANCHORS.get(r["batch"]) if r["size"] == "130m" and r["length"] == 2048 else None
    vs = (r["tokens_per_s"] / anchor[1]) if anchor and r["tokens_per_s"] else None
    body.append([r["backend"], r["batch"], r.get("packing", "plain"),
                 fmt(r["ms"], ".1f") if r["ms"] else r["status"],
                 fmt(r["tokens_per_s"], ".0f"), fmt(r.get("device_peak_gib"), ".2f"),
                 fmt(r.get("compiled_peak_gib"), ".2f"), fmt(vs, ".2f")])
  params = next((r["params"] for r in result["rows"] if "params" in r), None)
  text = (f"Training step, {result['size']} Mamba LM ({params} parameters), length "
          f"{result['length']}, AdamW, {result['dtype']} compute / float32 parameters, "
          f"{result['device']}.\n\n" + plotting.markdown_table(head, body))
  if result["size"] == "130m" and result["length"] == 2048:
    text += ("\n\nOfficial stack (mamba_ssm, fused kernels), same setting, H100:\n\n" +
             plotting.markdown_table(["batch", "ms/step", "tokens/s", "peak GiB"],
                                     [[b, a[0], a[1], a[2]] for b, a in ANCHORS.items()]))
  return text


def main(argv):
  del argv
  if FLAGS.child:  # one configuration, for measure_isolated
    row = measure(**json.loads(FLAGS.child))
    pathlib.Path(FLAGS.out_dir, "row.json").write_text(json.dumps(row))
    return
  if FLAGS.tiny:
    kw = dict(size="tiny", batches=[2], length=16, steps=3, warmup=1)
  else:
    kw = dict(size=FLAGS.size, batches=[int(b) for b in FLAGS.batches], length=FLAGS.length,
              steps=FLAGS.steps, warmup=FLAGS.warmup)
  isolate = (not FLAGS.tiny) if FLAGS.isolate is None else FLAGS.isolate
  backends = FLAGS.backends
  if backends is None:
    backends = ["sequential", "associative"] + ([] if FLAGS.tiny else ["pallas"])
  harness.check_choices("backends", backends, BACKENDS)
  harness.check_choices("packing", FLAGS.packing, ("plain", "packed"))
  device = harness.device_slug_of_child() if isolate else None
  bench = harness.Run("bench_train", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current, device=device)
  run(bench, backends=backends, dtype=FLAGS.dtype, learning_rate=FLAGS.learning_rate,
      isolate=isolate, max_minutes=FLAGS.max_minutes, packings=tuple(FLAGS.packing), **kw)
  bench.finish()


if __name__ == "__main__":
  app.run(main)
