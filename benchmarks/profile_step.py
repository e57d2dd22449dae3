"""Where a training step and a prefill of the Mamba LM spend their time, by kernel category.

Two workloads (``--workloads``):

* ``train``: the jit-compiled AdamW step of :mod:`benchmarks.bench_train`
  (:func:`benchmarks.lm_sizes.train_step_fn`: forward, next-token cross-entropy, backward, update;
  ``--dtype`` compute, float32 parameters, state donated) on ``--batch`` random sequences of
  ``--length`` tokens.
* ``prefill``: :meth:`ssmax.nn.MambaLM.prefill`, the call :func:`ssmax.nn.generate` makes on the
  prompt (parallel scan; the last position's logits and the cache), jit-compiled, over ``(batch,
  --length)`` random prompts for each of ``--prefill_batches``; parameters in ``--dtype``, as in
  :mod:`benchmarks.bench_generate`.

Each is timed (median of ``--repeats`` calls after ``--warmup``, :func:`harness.median_seconds`),
then ``--trace_calls`` calls run back to back under the JAX profiler. On a GPU, every kernel on
the trace's stream lines is put in a category and summed per call; ``idle`` is the part of the GPU
span (first kernel's start to last kernel's end) no kernel covers, so the categories sum to the
span (to more, if kernels overlap on several streams). The timed median is given beside the
span: XLA runs without command buffers while profiling, so the two can differ a little.

The rule (:meth:`benchmarks.trace.HloModule.classify`, tested in
``tests/benchmarks/test_profile_step.py``): a kernel's HLO op is the trace's ``hlo_op`` (else its
name), looked up in the compiled module (``compiled.as_text()``), and the first of these holds:

1. ``matmul``: it is or contains a ``dot``, an ungrouped ``convolution`` or a cuBLAS/cuDNN call;
2. ``conv``: it contains a grouped ``convolution``;
3. a custom call (Pallas: the Mosaic GPU / Triton kernels) takes the category of the Python
   function it was traced from (below): the selective-scan kernels are ``scan``;
4. ``copies/transposes``: nothing in it but data movement (copy, transpose, slice, concatenate,
   pad, broadcast, reshape, dynamic-(update-)slice, gather, dtype convert);
5. otherwise each arithmetic op in it votes for the category of the Python function it was traced
   from, read from the module's stack frames (innermost matching frame): ``ssmax/nn/norm.py``
   -> ``norm``; ``MambaMixer._conv`` -> ``conv``; ``optax/losses`` -> ``loss``; the rest of optax
   and flax's ``Optimizer.update`` -> ``optimizer``; ``ssmax/scan`` and ``ssmax/pallas/
   selective_scan_*`` -> ``scan`` (the XLA work around the scan kernels, or a scan written in
   JAX ops); a category with a strict majority of the arithmetic ops wins;
6. ``other fusions`` (gating, residual adds, SiLU, the embedding... and every mixed fusion).

A kernel whose op is not in the module is categorised by its name alone
(:func:`benchmarks.trace.name_category`). Each row records how much of the kernel time was matched
to an HLO op (``hlo_matched``), and the largest kernels are listed with their category and the
Python function it came from (the deciding one; for a matmul the one the product was traced from).

On the CPU there are no GPU kernels: the tables then give the XLA CPU runtime's thunks (same
rule), summed over threads, with no idle time. That exercises the script and the rule; it is not
the GPU breakdown, and the tables say so.

Writes ``results/profile_step/<date>_<device>/profile_step.{md,json,log}`` (see
:mod:`benchmarks.harness`).

  python -m benchmarks.profile_step                                # GPU: 130M, train b8, prefill b16, b64
  python -m benchmarks.profile_step --workloads=train --batch=16
  python -m benchmarks.profile_step --tiny                         # CPU smoke run
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import harness, trace
from benchmarks.lm_sizes import SIZES, build, param_count, train_state, train_step_fn, vocab_size
from experiments import plotting
from ssmax import BACKENDS

WORKLOADS = ("train", "prefill")

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU smoke run: tiny model, length 16, batch 2, 2 timed "
                  "calls.")
flags.DEFINE_list("workloads", list(WORKLOADS), f"From {list(WORKLOADS)}.")
flags.DEFINE_enum("size", "130m", list(SIZES), "Model shape.")
flags.DEFINE_integer("batch", 8, "Training batch.")
flags.DEFINE_list("prefill_batches", ["16", "64"], "Prefill batches.")
flags.DEFINE_integer("length", 2048, "Tokens per sequence (training) and per prompt (prefill).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (training "
                  "parameters float32; prefill parameters in this dtype).")
flags.DEFINE_string("backend", "auto", "Scan backend.")
flags.DEFINE_float("learning_rate", 3e-4, "AdamW learning rate.")
flags.DEFINE_integer("repeats", 10, "Timed calls (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first one compiles).")
flags.DEFINE_integer("trace_calls", 3, "Calls traced back to back (the breakdown is per call).")
flags.DEFINE_integer("top", 15, "Kernels listed per configuration.")
harness.define_flags(flags)


# ----------------------------------------------------------------------------------------------
# The workloads: (compiled call, a function making one call, its HLO text).


def train_workload(size, batch, length, dtype, backend, learning_rate):
  """The training step, compiled; ``call()`` runs one step on the state the previous one left."""
  graphdef, state, params = train_state(size, dtype=dtype, learning_rate=learning_rate,
                                        scan_backend=backend)
  tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, vocab_size(size))
  compiled, compile_s = harness.compile_timed(train_step_fn(graphdef), state, tokens, None)
  carry, losses = [state], []

  def call():  # the state is donated: each step takes the previous one's
    loss, carry[0] = compiled(carry[0], tokens, None)
    losses.append(loss)
    return loss

  def check():
    values = [float(l) for l in losses]
    if not np.all(np.isfinite(values)):
      raise FloatingPointError(f"non-finite loss: {values}")
    return dict(first_loss=values[0], last_loss=values[-1])

  return compiled, compile_s, params, call, check


def prefill_fn(graphdef):
  """``prefill(state, tokens) -> (last logits, cache)``, jit-compiled: what
  :func:`ssmax.nn.generate` runs on the prompt (no ``prompt_lengths``)."""

  @jax.jit
  def prefill(state, tokens):
    return nnx.merge(graphdef, state).prefill(tokens)

  return prefill


def prefill_workload(size, batch, length, dtype, backend):
  model = build("mamba", size, dtype=dtype, scan_backend=backend)
  params = param_count(model)
  graphdef, state = nnx.split(model)
  del model
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, vocab_size(size))
  compiled, compile_s = harness.compile_timed(prefill_fn(graphdef), state, tokens)
  outs = []

  def call():
    logits, cache = compiled(state, tokens)
    outs[:] = [logits]
    return logits, cache

  def check():
    if not np.all(np.isfinite(np.asarray(outs[0], np.float32))):
      raise FloatingPointError("non-finite prefill logits")
    return {}

  return compiled, compile_s, params, call, check


# ----------------------------------------------------------------------------------------------
# One configuration: time, trace, categorise.


def classifier(module: trace.HloModule):
  """``kernel -> (category, where)`` for kernels of ``module`` (cached per HLO op)."""
  cache = {}

  def classify(k: trace.Kernel):
    key = (k.hlo_op, k.name)
    if key not in cache:
      inst = module.find(k.hlo_op) or module.find(k.name)
      cache[key] = (module.classify(inst) if inst is not None
                    else (trace.name_category(k.name), "(no HLO op)"))
    return cache[key]

  return classify


def breakdown(tr: trace.Trace, module: trace.HloModule, calls: int, top: int) -> dict:
  """The trace's GPU kernels by category, or failing those its CPU thunks (control-flow thunks
  left out: the thunks they run are counted)."""
  if tr.gpu:
    kernels, source, idle = tr.gpu, "gpu kernels", True
  else:
    kernels = [k for k in tr.cpu if k.hlo_module in (None, module.name)]
    kernels = [k for k in kernels
               if (module.find(k.hlo_op) is None
                   or module.find(k.hlo_op).opcode not in trace.CONTROL_FLOW)]
    source, idle = ("cpu thunks" if kernels else None), False
  out = dict(trace_source=source, **trace.summarize(kernels, calls, top, classifier(module),
                                                   trace.CATEGORIES, idle=idle))
  total = sum(k.duration_ns for k in kernels)
  matched = sum(k.duration_ns for k in kernels
                if module.find(k.hlo_op) is not None or module.find(k.name) is not None)
  out["hlo_matched"] = matched / total if total else None
  out["trace_modules"] = sorted({k.hlo_module for k in kernels if k.hlo_module})
  return out


def measure(workload, *, size, batch, length, dtype, backend, learning_rate, repeats, warmup,
            trace_calls, top) -> dict:
  row = dict(workload=workload, size=size, batch=batch, length=length, ms=None)

  def timed():
    if workload == "train":
      compiled, compile_s, params, call, check = train_workload(size, batch, length, dtype,
                                                                backend, learning_rate)
    else:
      compiled, compile_s, params, call, check = prefill_workload(size, batch, length, dtype,
                                                                  backend)
    seconds = harness.median_seconds(call, repeats=repeats, warmup=warmup)
    module = trace.HloModule(compiled.as_text())

    def traced():
      out = None
      for _ in range(trace_calls):
        out = call()
      return out

    tr = trace.profile(traced)
    return dict(params=params, compile_s=compile_s, ms=1e3 * seconds,
                tokens_per_s=batch * length / seconds, hlo_module=module.name,
                hlo_instructions=len(module.instructions), trace_lines=tr.lines,
                **check(), **breakdown(tr, module, trace_calls, top))

  row.update(harness.attempt(timed))
  return row


# ----------------------------------------------------------------------------------------------
# The sweep and tables.


def run(bench: harness.Run, *, workloads, size, batch, prefill_batches, length, dtype, backend,
        learning_rate, repeats, warmup, trace_calls, top) -> dict:
  """Profiles every configuration into ``bench.record`` and returns it; the run's files are
  rewritten after every configuration."""
  result = bench.record
  result.update(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                size=size, length=length, dtype=jnp.dtype(dtype).name, backend=backend,
                repeats=repeats, trace_calls=trace_calls, categories=list(trace.CATEGORIES),
                rows=[])
  configs = [(w, b) for w in workloads
             for b in ([batch] if w == "train" else prefill_batches)]
  for workload, b in configs:
    row = measure(workload, size=size, batch=b, length=length, dtype=dtype, backend=backend,
                  learning_rate=learning_rate, repeats=repeats, warmup=warmup,
                  trace_calls=trace_calls, top=top)
    result["rows"].append(row)
    bench.save(tables(result))
    bench.log(f"{workload:<8} batch {b:>3}: " + (
        f"{row['ms']:.2f} ms, compiled in {row['compile_s']:.1f} s, traced: "
        f"{row['trace_source'] or 'nothing'}" if row["status"] == "ok" else row["status"]))
  bench.save(tables(result))
  bench.log("\n" + tables(result) + f"\n\nwrote {bench.dir}")
  return result


def tables(result) -> str:
  f = lambda v, spec=".2f": "—" if v is None else format(v, spec)
  parts = [f"Mamba LM {result['size']}, length {result['length']}, {result['dtype']} compute, "
           f"scan backend {result['backend']}, {result['device']} ({result['platform']}). "
           f"Timed: median of {result['repeats']} calls; breakdown: {result['trace_calls']} "
           "calls under the JAX profiler, per call. Categories: see the docstring of "
           "benchmarks/profile_step.py."]
  for r in result["rows"]:
    title = f"\n### {r['workload']}, batch {r['batch']}"
    if r["status"] != "ok":
      parts.append(f"{title}: {r['status']}")
      continue
    what = ("training step (forward, loss, backward, AdamW)" if r["workload"] == "train"
            else "prefill (last logits and cache)")
    head = (f"{title}\n\n{what}: {r['ms']:.2f} ms timed, {r['tokens_per_s']:.0f} tokens/s, "
            f"{r['params']} parameters, compiled in {r['compile_s']:.1f} s.")
    if r["trace_source"] is None:
      parts.append(head + " The trace holds no kernels: the breakdown needs a GPU.")
      continue
    gpu = r["trace_source"] == "gpu kernels"
    cats = r["categories_us"]
    total = r["span_us"] if gpu else r["busy_us"]
    head += (f" Traced: {r['kernels_per_step']:.0f} kernels per call, {f(r['busy_us'] / 1e3)} "
             f"ms busy in a GPU span of {f(r['span_us'] / 1e3)} ms; % of the span."
             if gpu else
             f" No GPU here: these are the XLA CPU runtime's thunks ({r['kernels_per_step']:.0f} "
             f"per call), {f(r['busy_us'] / 1e3)} ms summed over threads, % of that sum; not the "
             "GPU breakdown, which needs a GPU.")
    head += f" Kernel time matched to an HLO op: {f(100 * (r['hlo_matched'] or 0), '.0f')}%."
    body = [[c, f(cats[c] / 1e3, ".3f"), f(100 * cats[c] / total if total else None, ".1f")]
            for c in result["categories"] if c in cats]
    body.append(["total", f(sum(cats.values()) / 1e3, ".3f"),
                 f(100 * sum(cats.values()) / total if total else None, ".1f")])
    parts.append(head + "\n\n" + plotting.markdown_table(["category", "ms per call", "%"], body))
    if r["top"]:
      parts.append(f"\nLargest {'kernels' if gpu else 'thunks'}:\n\n" + plotting.markdown_table(
          ["kernel", "category", "from", "per call", "ms per call"],
          [[t["name"], t["category"], t["where"] or "—", f"{t['per_step']:.0f}",
            f(t["us_per_step"] / 1e3, ".3f")] for t in r["top"]]))
  return "\n".join(parts)


def main(argv):
  del argv
  harness.check_choices("workloads", FLAGS.workloads, WORKLOADS)
  harness.check_choices("backend", [FLAGS.backend], BACKENDS)
  if FLAGS.tiny:
    kw = dict(size="tiny", batch=2, prefill_batches=[2], length=16, repeats=2, warmup=1,
              trace_calls=2)
  else:
    kw = dict(size=FLAGS.size, batch=FLAGS.batch, length=FLAGS.length,
              prefill_batches=[int(b) for b in FLAGS.prefill_batches], repeats=FLAGS.repeats,
              warmup=FLAGS.warmup, trace_calls=FLAGS.trace_calls)
  bench = harness.Run("profile_step", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current)
  run(bench, workloads=FLAGS.workloads, dtype=jnp.dtype(FLAGS.dtype), backend=FLAGS.backend,
      learning_rate=FLAGS.learning_rate, top=FLAGS.top, **kw)
  bench.finish()


if __name__ == "__main__":
  app.run(main)
