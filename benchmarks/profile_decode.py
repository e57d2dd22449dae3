"""Where a Mamba LM's decode step spends its time, and what the fused step kernel changes.

For each size, batch and step backend, a jitted ``lax.scan`` of ``--steps`` greedy decode steps
(:meth:`ssmax.nn.MambaLM.step`, each token fed back) is timed (median of ``--repeats``), then run
once more under the JAX profiler. The GPU kernels in the trace are summed by name and sorted into
matrix products, the fused step kernel, other XLA fusions and copies; the part of the GPU span not
covered by a kernel is the device idling between launches.

Step backends: ``xla`` runs each layer's SSM step as plain JAX ops (``scan_backend="associative"``,
which XLA fuses as it sees fit); ``pallas`` runs it as one fused kernel
(:func:`ssmax.pallas.selective_state_update`: Δ projection, softplus, update, C·h, D and gate).
Batch-1 matrix products run as two-row products (:mod:`ssmax.nn.dense`); the decode step without
them is recorded in ``results/profile_decode/2026-11-23_h100_run2`` (its ``xla_nopad`` rows).

``--kernel_micro`` also times the SSM step alone at each size's layer shape: the plain JAX step
and the kernel under a few :class:`ssmax.pallas.StepConfig` blockings, each in a ``fori_loop``
whose per-iteration cost on a GPU (~17 µs on an H100) is part of every number. ``--check`` compares the
kernel with a float64 NumPy step and the two backends' LM logits on the device.

Writes ``results/profile_decode/<date>_<device>/profile_decode.{md,json,png,log}`` (see
:mod:`benchmarks.harness`).

  python -m benchmarks.profile_decode --sizes=1.4b,130m --batches=1,64     # GPU
  python -m benchmarks.profile_decode --tiny                               # CPU smoke run
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax import lax

from benchmarks import harness, trace
from benchmarks.lm_sizes import SIZES, build, mamba_config, param_count
from experiments import plotting
from ssmax import pallas as ssmax_pallas
from ssmax import selective_state_update
from ssmax.nn import MambaLM, MambaMixer

STEP_BACKENDS = {"xla": "associative", "pallas": "pallas"}
CATEGORIES = ("matmul", "step kernel", "other fusions", "copies", "idle")
MICRO_CONFIGS = [(16, 1), (32, 1), (32, 4), (64, 2), (64, 4), (128, 4)]

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU smoke run: the tiny shape, batch 1 and 3, 4 steps.")
flags.DEFINE_list("sizes", ["1.4b", "130m"], f"Model sizes, from {sorted(SIZES)}.")
flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
flags.DEFINE_list("backends", list(STEP_BACKENDS), "Step backends: xla, pallas.")
flags.DEFINE_integer("steps", 64, "Decode steps per timed call.")
flags.DEFINE_integer("repeats", 5, "Timed calls per configuration (the median is reported).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
flags.DEFINE_integer("top", 8, "Kernels listed per configuration.")
flags.DEFINE_bool("kernel_micro", True, "Also time the SSM step alone (plain JAX vs kernel).")
flags.DEFINE_bool("check", True, "Also check the kernel against float64 NumPy and the LM logits.")
harness.define_flags(flags)


# ----------------------------------------------------------------------------------------------
# Models and the timed decode loop.


def set_step_backend(model: MambaLM, backend: str) -> None:
  """Points every mixer's scan (and step) at ``backend``'s scan backend, parameters unchanged.
  Takes effect in functions traced afterwards."""
  for _, m in nnx.iter_modules(model):
    if isinstance(m, MambaMixer):
      m.scan_backend = STEP_BACKENDS[backend]


def decode_loop(model: MambaLM, steps: int):
  """A jitted ``(cache, token) -> (cache, token)`` running ``steps`` greedy decode steps."""
  graphdef, state = nnx.split(model)
  vocab, d_conv = model.config.vocab_size, model.config.d_conv

  @jax.jit
  def run(state, cache, token):
    m = nnx.merge(graphdef, state)

    def body(carry, t):
      cache, token = carry
      # As ssmax.nn.generate: the conv states as rings, updated in place.
      logits, cache = m.step(cache, token, conv_slot=t % d_conv)
      return (cache, jnp.argmax(logits[:, :vocab], axis=-1).astype(jnp.int32)), None

    cache, token = lax.scan(body, (cache, token), jnp.arange(steps, dtype=jnp.int32))[0]
    # Back to the default layout (oldest input first), so that the next call starts from it.
    shift = -(steps % d_conv)
    layers = tuple(s._replace(conv=jnp.roll(s.conv, shift, axis=1)) for s in cache.layers)
    return cache._replace(layers=layers), token

  return lambda cache, token: run(state, cache, token)


# ----------------------------------------------------------------------------------------------
# The profiler trace (read by :mod:`benchmarks.trace`).


def category(name: str) -> str:
  lower = name.lower()
  if "selective_state_update" in lower:
    return "step kernel"
  if trace.MATMUL_NAME.search(lower):
    return "matmul"
  if re.search(r"memcpy|memset|copy", lower):
    return "copies"
  return "other fusions"


def summarize(kernels, steps: int, top: int) -> dict:
  """Per-step microseconds by category (:func:`category`, from the kernel's name) and the ``top``
  kernels by time."""
  return trace.summarize(kernels, steps, top, lambda k: (category(k.name), ""), CATEGORIES)


# ----------------------------------------------------------------------------------------------
# The SSM step alone, and checks.


def layer_shape(size: str) -> dict:
  cfg = mamba_config(size)
  return dict(channels=cfg.expand * cfg.d_model, state=cfg.d_state,
              rank=-(-cfg.d_model // 16) if cfg.dt_rank == "auto" else cfg.dt_rank)


def step_inputs(key, batch, channels, state, rank, dtype):
  k = jax.random.split(key, 10)
  return dict(
      state=jax.random.normal(k[0], (batch, channels, state)),
      u=jax.random.normal(k[1], (batch, channels), dtype),
      delta=jax.random.normal(k[2], (batch, rank), dtype),
      A=-jnp.exp(jax.random.normal(k[3], (channels, state)) * 0.5),
      B=jax.random.normal(k[4], (batch, state), dtype),
      C=jax.random.normal(k[5], (batch, state), dtype),
      D=jax.random.normal(k[6], (channels,)),
      z=jax.random.normal(k[7], (batch, channels), dtype),
      delta_bias=jax.random.normal(k[8], (channels,)) * 0.5 - 2.0,
      delta_proj=(jax.random.normal(k[9], (rank, channels)) * rank**-0.5).astype(dtype))


def numpy_step(x) -> tuple[np.ndarray, np.ndarray]:
  """float64 reference of one step, from the inputs of :func:`step_inputs`."""
  f = {k: np.asarray(v, np.float64) for k, v in x.items()}
  dt = np.logaddexp(0.0, f["delta"] @ f["delta_proj"] + f["delta_bias"])
  h = np.exp(dt[..., None] * f["A"]) * f["state"] + (dt * f["u"])[..., None] * f["B"][:, None]
  y = (np.sum(h * f["C"][:, None], -1) + f["D"] * f["u"]) * f["z"] / (1 + np.exp(-f["z"]))
  return y, h


def kernel_micro(size: str, batch: int, dtype, iters: int = 200) -> list[dict]:
  """Microseconds per SSM step at one layer's shape: the plain JAX step and kernel blockings,
  each in a jitted ``fori_loop`` of ``iters`` steps that carries the state."""
  x = step_inputs(jax.random.key(1), batch, **layer_shape(size), dtype=dtype)
  interpret = jax.default_backend() != "gpu"

  def plain(h):
    return selective_state_update(h, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                  x["delta_bias"], True, delta_proj=x["delta_proj"],
                                  backend="sequential")

  def kernel(h, config):
    return ssmax_pallas.selective_state_update(
        h, x["u"], x["delta"], x["A"], x["B"][:, None], x["C"][:, None], x["D"], x["z"],
        x["delta_bias"], x["delta_proj"], delta_softplus=True, interpret=interpret,
        config=config)

  variants = [("xla", plain)] + [
      (f"pallas block {b} warps {w}",
       functools.partial(kernel, config=ssmax_pallas.StepConfig(b, w)))
      for b, w in MICRO_CONFIGS]
  acc0 = jnp.zeros((batch, x["u"].shape[1]), jnp.float32)
  rows = []
  for name, step in variants:
    @jax.jit
    def loop(h, acc, step=step):
      def body(_, carry):
        h, acc = carry
        y, h = step(h)
        return h, acc + y.astype(jnp.float32)  # y feeds the carry: no backend can drop it
      return lax.fori_loop(0, iters, body, (h, acc))

    seconds = harness.median_seconds(lambda: loop(x["state"], acc0), repeats=5)
    rows.append(dict(size=size, batch=batch, variant=name, us_per_step=1e6 * seconds / iters))
  return rows


def kernel_checks(sizes, batches=(1, 5)) -> list[dict]:
  """The kernel and the plain step against float64 NumPy at each size's layer shape."""
  rows = []
  for size in sizes:
    for batch in batches:
      for dtype in (jnp.float32, jnp.bfloat16):
        x = step_inputs(jax.random.key(batch), batch, **layer_shape(size), dtype=dtype)
        want_y, want_h = numpy_step(x)
        row = dict(size=size, batch=batch, dtype=jnp.dtype(dtype).name)
        for backend in ("pallas", "sequential"):
          y, h = selective_state_update(x["state"], x["u"], x["delta"], x["A"], x["B"], x["C"],
                                        x["D"], x["z"], x["delta_bias"], True,
                                        delta_proj=x["delta_proj"], backend=backend)
          row[f"{backend}_y_rel"] = harness.rel_err(y, want_y)
          row[f"{backend}_state_rel"] = harness.rel_err(h, want_h)
        rows.append(row)
  return rows


def lm_check(model: MambaLM, size: str, batch: int = 2, steps: int = 8) -> dict:
  """Logits of ``steps`` decode steps with each step backend, and how far apart they are."""
  tokens = jax.random.randint(jax.random.key(3), (batch, steps), 0, model.config.vocab_size)
  logits = {}
  for backend in STEP_BACKENDS:
    set_step_backend(model, backend)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
      m = nnx.merge(graphdef, state)
      body = lambda cache, t: m.step(cache, t)[::-1]
      return lax.scan(body, m.init_cache(batch), tokens.T)[1]

    logits[backend] = np.asarray(run(state, tokens), np.float32)
  greedy = {b: l.argmax(-1) for b, l in logits.items()}
  return dict(size=size, batch=batch, steps=steps,
              logits_rel=harness.rel_err(logits["pallas"], logits["xla"]),
              greedy_agree=float(np.mean(greedy["pallas"] == greedy["xla"])))


# ----------------------------------------------------------------------------------------------
# The sweep, tables and plot.


def run(bench: harness.Run, *, sizes, batches, backends, steps, repeats, dtype, top=8,
        micro=True, check=True) -> dict:
  """Profiles every (size, batch, backend) into ``bench.record`` and returns it; the run's files
  are rewritten after every configuration."""
  log = bench.log
  result = bench.record
  result.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                dtype=jnp.dtype(dtype).name, steps=steps, repeats=repeats,
                rows=[], micro=[], checks=[], lm_checks=[], trace_lines=[])
  for size in sizes:
    model = build("mamba", size, dtype=dtype)
    params = param_count(model)
    if check:
      result["lm_checks"].append(lm_check(model, size))
      log(f"{size}: LM logits, pallas vs xla step: {result['lm_checks'][-1]}")
    for batch in batches:
      cache = model.init_cache(batch)
      token = jnp.zeros((batch,), jnp.int32)
      for backend in backends:
        set_step_backend(model, backend)
        loop = decode_loop(model, steps)
        seconds = harness.median_seconds(lambda: loop(cache, token), repeats=repeats)
        kernels, lines = trace.device_kernels(lambda: loop(cache, token))
        result["trace_lines"] = sorted(set(result["trace_lines"]) | set(lines))
        row = dict(size=size, params=params, batch=batch, backend=backend,
                   ms_per_step=1e3 * seconds / steps, **summarize(kernels, steps, top))
        result["rows"].append(row)
        log(f"{size:>5} batch {batch:>3} {backend:<6}: {row['ms_per_step']:.3f} ms/step"
            + (f", {row['kernels_per_step']:.0f} kernels/step" if row["kernels_per_step"] else ""))
        bench.save(tables(result), plot)
      if micro:
        result["micro"] += kernel_micro(size, batch, dtype)
        bench.save(tables(result), plot)
    del model
  if check:
    result["checks"] = kernel_checks(sizes)
  bench.save(tables(result), plot)
  log("\n" + tables(result) + f"\n\nwrote {bench.dir}")
  return result


def tables(result) -> str:
  f = lambda v, spec=".1f": "—" if v is None else format(v, spec)
  xla = {(r["size"], r["batch"]): r["ms_per_step"] for r in result["rows"]
         if r["backend"] == "xla"}
  parts = [f"Decode steps of the Mamba LM, {result['dtype']}, median of {result['repeats']} "
           f"calls of {result['steps']} steps, {result['device']}. Microseconds per step; idle "
           "is the GPU span not covered by a kernel."]
  body = []
  for r in result["rows"]:
    c = r["categories_us"]
    base = xla.get((r["size"], r["batch"]))
    body.append([r["size"], r["batch"], r["backend"], f"{r['ms_per_step']:.3f}",
                 f(r["kernels_per_step"], ".0f"), f(r["busy_us"]), *(f(c.get(k)) for k in
                                                                      CATEGORIES),
                 f(base / r["ms_per_step"], ".2f") if base else "—"])
  parts.append(plotting.markdown_table(["size", "batch", "step", "ms/step", "kernels/step", "busy µs",
                               *(f"{k} µs" for k in CATEGORIES), "× xla"], body))
  tops = [[f"{r['size']} b{r['batch']} {r['backend']}", t["name"], f"{t['per_step']:.0f}",
           f"{t['us_per_step']:.1f}"] for r in result["rows"] for t in r["top"]]
  if tops:
    parts.append("\nLargest kernels (per decode step):\n\n"
                 + plotting.markdown_table(["configuration", "kernel", "launches", "µs"], tops))
  if result["micro"]:
    parts.append("\nThe SSM step alone, one layer's shape (µs per step in a fori_loop of 200; "
                 "the loop's own per-iteration cost is included):\n\n"
                 + plotting.markdown_table(["size", "batch", "variant", "µs/step"],
                                  [[m["size"], m["batch"], m["variant"], f"{m['us_per_step']:.2f}"]
                                   for m in result["micro"]]))
  if result["checks"]:
    parts.append("\nStep against float64 NumPy (max rel. error):\n\n" + plotting.markdown_table(
        ["size", "batch", "dtype", "pallas y", "pallas state", "plain y", "plain state"],
        [[c["size"], c["batch"], c["dtype"], *(f"{c[k]:.1e}" for k in (
            "pallas_y_rel", "pallas_state_rel", "sequential_y_rel", "sequential_state_rel"))]
         for c in result["checks"]]))
  if result["lm_checks"]:
    parts.append("\nLM logits over decode steps, pallas step vs xla step:\n\n" + plotting.markdown_table(
        ["size", "batch", "steps", "max rel. error", "greedy tokens equal"],
        [[c["size"], c["batch"], c["steps"], f"{c['logits_rel']:.1e}",
          f"{c['greedy_agree']:.0%}"] for c in result["lm_checks"]]))
  return "\n".join(parts)


def plot(result, path) -> None:
  """Stacked bars: a decode step's microseconds by kernel category, per configuration."""
  rows = result["rows"]
  labels = [f"{r['size']} b{r['batch']} {r['backend']}" for r in rows]
  fig, ax = plotting.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
  left = np.zeros(len(rows))
  traced = any(r["categories_us"] for r in rows)
  for i, cat in enumerate(CATEGORIES if traced else ()):
    vals = np.array([r["categories_us"].get(cat, 0.0) for r in rows])
    ax.barh(labels, vals, left=left, label=cat, color=f"C{i}")
    left += vals
  ax.plot([1e3 * r["ms_per_step"] for r in rows], labels, "k|", ms=14, label="wall time")
  ax.invert_yaxis()
  ax.set(xlabel="µs per decode step", title=f"Where a decode step goes ({result['device']})")
  ax.legend(fontsize=8, loc="lower right")
  plotting.save(fig, path)


def main(argv):
  del argv
  if FLAGS.tiny:
    kw = dict(sizes=["tiny"], batches=[1, 3], steps=4, repeats=1)
  else:
    harness.check_choices("sizes", FLAGS.sizes, SIZES)
    kw = dict(sizes=FLAGS.sizes, batches=[int(b) for b in FLAGS.batches], steps=FLAGS.steps,
              repeats=FLAGS.repeats)
  harness.check_choices("backends", FLAGS.backends, STEP_BACKENDS)
  bench = harness.Run("profile_decode", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current)
  run(bench, backends=FLAGS.backends, dtype=jnp.dtype(FLAGS.dtype), top=FLAGS.top,
      micro=FLAGS.kernel_micro, check=FLAGS.check, **kw)
  bench.finish()


if __name__ == "__main__":
  app.run(main)
