r"""Sequence- and data-parallel speed and reach: one device against N.

    python -m benchmarks.bench_parallel                   # all visible GPUs, 130M model
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python -m benchmarks.bench_parallel --tiny          # CPU smoke run, seconds

Three measurements, each on 1 device and on N (``--devices``, default all):

1. The selective scan, forward and forward+backward, at one global shape ``(batch, length,
   d_inner, d_state)``: on N devices through :func:`ssmax.parallel.selective_scan` with the length
   split N ways (mesh ``data=1, seq=N``).
2. A training step (AdamW) of a :class:`ssmax.nn.MambaLM` (130M: ``d_model=768, n_layer=24``):
   data-parallel (``data=N``) at the same batch per device as the one-device row (global batch
   ``N * --train_batch``: throughput scaling), and sequence-parallel (``seq=N``) at the one-device
   row's global batch (each device holds ``1/N`` of every sequence); gradients taken inside
   ``shard_map`` by :func:`ssmax.parallel.value_and_grad`. The speed-up is tokens/s over the
   one-device row's.
3. The longest sequence whose training step fits at batch 1: doubling from ``--search_start``
   times the devices until the step runs out of memory (or reaches ``--search_max``), bisecting to
   ``--search_granularity`` tokens; on one device and sequence-parallel on N.

Times are medians of ``--repeats`` runs after a warm-up (compilation excluded). A row that runs
out of memory or fails is recorded as such (``status``) and the others go on; ``--parts`` picks the
measurements. Prints Markdown tables and writes ``results/bench_parallel/<date>_<device>/bench_parallel.{json,md,log}`` (see
:mod:`benchmarks.harness`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

import ssmax
from benchmarks import harness
from benchmarks.lm_sizes import build, vocab_size
from experiments import plotting
from ssmax import nn as snn
from ssmax import parallel

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "Tiny shapes for a CPU smoke run (e.g. 4 fake devices).")
flags.DEFINE_integer("devices", None, "N, the devices to compare with one; default all visible.")
flags.DEFINE_string("backend", "auto",
                    "Selective scan backend (auto, sequential, associative, pallas).")
flags.DEFINE_list("scan_shape", None, "batch,length,d_inner,d_state of the scan; default "
                  "1,32768,1536,16 (tiny: 2,64,8,4).")
flags.DEFINE_integer("train_batch", None, "Batch of the one-device training step (and per device "
                     "data-parallel); default 8 (tiny: 2).")
flags.DEFINE_integer("train_length", None,
                     "Sequence length of the training step; default 2048 (tiny: 32).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                  "Compute dtype (scan inputs, model).")
flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (median reported).")
flags.DEFINE_list("parts", ["scan", "train", "fit"], "Measurements to run: scan, train, fit (the "
                  "longest sequence that fits; slow: one compile per try).")
flags.DEFINE_integer("search_start", None, "First length tried; default 8192 (tiny: 16).")
flags.DEFINE_integer("search_max", None, "Longest length tried; default 1048576 (tiny: 32).")
flags.DEFINE_integer("search_granularity", None, "Bisection stops at this many tokens; default "
                     "4096 (tiny: 16). A multiple of N.")
flags.DEFINE_list("fit_devices", None, "Device counts the fit part measures; default 1 and N.")
flags.DEFINE_list("fit_lengths", None, "Instead of searching, try only these lengths (e.g. N times "
                  "the one-device result, to check a ratio within one call).")
harness.define_flags(flags)


@dataclasses.dataclass(frozen=True)
class Settings:
  scan_shape: tuple[int, int, int, int]
  train_batch: int
  train_length: int
  size: str  # of benchmarks.lm_sizes
  search_start: int
  search_max: int
  search_granularity: int


def settings() -> Settings:
  tiny = FLAGS.tiny
  pick = lambda value, big, small: value if value is not None else (small if tiny else big)
  shape = FLAGS.scan_shape or (["2", "64", "8", "4"] if tiny else ["1", "32768", "1536", "16"])
  if len(shape) != 4:
    raise app.UsageError(f"--scan_shape needs batch,length,d_inner,d_state; got {shape}")
  return Settings(tuple(int(s) for s in shape), pick(FLAGS.train_batch, 8, 2),
                  pick(FLAGS.train_length, 2048, 32), "tiny" if tiny else "130m",
                  pick(FLAGS.search_start, 8192, 16), pick(FLAGS.search_max, 1 << 20, 32),
                  pick(FLAGS.search_granularity, 4096, 16))


def timed_ms(fn, *args, repeats: int, inner: int = 1) -> float:
  """Median ms of ``fn(*args)`` after two warm-up calls (the first compiles); ``inner`` calls are
  enqueued per measurement (for millisecond kernels: hides the host's dispatch gaps)."""
  return 1e3 * harness.median_seconds(lambda: fn(*args), repeats=repeats, inner=inner)


# ----------------------------------------------------------------------------------------------
# 1. The selective scan.


def scan_inputs(shape, dtype, seed=0):
  b, l, d, n = shape
  k = jax.random.split(jax.random.key(seed), 6)
  return dict(
      u=jax.random.normal(k[0], (b, l, d), dtype),
      delta=(0.5 * jax.random.normal(k[1], (b, l, d))).astype(dtype),
      A=-jnp.exp(0.5 * jax.random.normal(k[2], (d, n))),
      B=jax.random.normal(k[3], (b, l, n), dtype),
      C=jax.random.normal(k[4], (b, l, n), dtype),
      D=jnp.ones((d,)),
      z=jax.random.normal(k[5], (b, l, d), dtype),
      delta_bias=jnp.full((d,), -1.0),
      delta_softplus=True)


def scan_row(s: Settings, devices: int, dtype) -> dict:
  arrays = {k: v for k, v in scan_inputs(s.scan_shape, dtype).items() if k != "delta_softplus"}
  mesh = parallel.make_mesh(1, devices)
  if devices == 1:
    scan = lambda a: ssmax.selective_scan(**a, delta_softplus=True, backend=FLAGS.backend)
  else:
    scan = lambda a: parallel.selective_scan(mesh, **a, delta_softplus=True,
                                             backend=FLAGS.backend)
  fwd = jax.jit(scan)
  fwd_bwd = jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(jnp.float32))))
  placed = arrays
  if devices > 1:
    along_length = {k: arrays[k] for k in ("u", "delta", "B", "C", "z")}
    placed = dict(parallel.shard_batch(mesh, along_length, data_axis=None),
                  **parallel.replicate(mesh, {k: arrays[k] for k in ("A", "D", "delta_bias")}))
  return dict(fwd_ms=timed_ms(fwd, placed, repeats=FLAGS.repeats, inner=5),
              fwd_bwd_ms=timed_ms(fwd_bwd, placed, repeats=FLAGS.repeats, inner=5))


def bench_scan(s: Settings, n: int, dtype, log) -> list[dict]:
  rows = []
  for devices in (1, n):
    rows.append(dict(devices=devices, mesh=f"seq={devices}",
                     **harness.attempt(lambda: scan_row(s, devices, dtype), log)))
    jax.clear_caches()
  return rows


# ----------------------------------------------------------------------------------------------
# 2. The training step.


def make_train_step(model: snn.MambaLM, mesh, data_axis, sequence_axis, n_tokens: int):
  """A jitted AdamW step of ``model`` on ``mesh`` and its initial (params, opt_state)."""
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(3e-4)
  params = parallel.replicate(mesh, params)
  opt_state = parallel.replicate(mesh, optimizer.init(params))

  def local_loss(params, tokens, targets):
    logits = nnx.merge(graphdef, params)(tokens).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum() / n_tokens

  value_and_grad = parallel.value_and_grad(local_loss, mesh, data_axis=data_axis,
                                           sequence_axis=sequence_axis)

  @jax.jit
  def step(params, opt_state, tokens, targets):
    loss, grads = value_and_grad(params, tokens, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, params, opt_state


def train_batch(s: Settings, mesh, batch: int, length: int, data_axis, sequence_axis):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size(s.size), (batch, length + 1)).astype(np.int32)
  return parallel.shard_batch(mesh, (tokens[:, :-1], tokens[:, 1:]), data_axis=data_axis,
                              sequence_axis=sequence_axis)


def run_train(s: Settings, devices: int, mode: str, batch: int, length: int, dtype,
              repeats: int) -> float:
  """Median ms of a training step; ``mode`` is ``"data"`` or ``"seq"`` (the split axis)."""
  mesh = parallel.make_mesh(devices, 1) if mode == "data" else parallel.make_mesh(1, devices)
  sequence_axis = "seq" if mode == "seq" else None
  model = build("mamba", s.size, dtype=dtype, scan_backend=FLAGS.backend,
                sequence_axis=sequence_axis)
  step, params, opt_state = make_train_step(model, mesh, "data", sequence_axis, batch * length)
  tokens, targets = train_batch(s, mesh, batch, length, "data", sequence_axis)
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = step(state[0], state[1], tokens, targets)
    return loss

  return timed_ms(run, repeats=repeats)


def bench_train(s: Settings, n: int, dtype, log) -> list[dict]:
  """Rows: one device; data-parallel at the same batch per device; sequence-parallel at the same
  global batch."""
  rows = []
  for devices, mode, batch in ((1, "data", s.train_batch), (n, "data", n * s.train_batch),
                               (n, "seq", s.train_batch)):
    tokens = batch * s.train_length

    def measure():
      ms = run_train(s, devices, mode, batch, s.train_length, dtype, FLAGS.repeats)
      return dict(step_ms=ms, tokens_per_s=tokens / (ms / 1e3))

    rows.append(dict(devices=devices, mesh=f"{mode}={devices}", batch=batch,
                     **harness.attempt(measure, log)))
    jax.clear_caches()
  return rows


# ----------------------------------------------------------------------------------------------
# 3. The longest sequence that fits.


def fits(s: Settings, devices: int, length: int, dtype, log=print) -> bool:
  """Whether a batch-1 training step runs: plain on one device, sequence-parallel on several."""
  try:
    run_train(s, devices, "data" if devices == 1 else "seq", 1, length, dtype, repeats=1)
    ok = True
  except jax.errors.JaxRuntimeError as err:
    if not harness.is_oom(err):
      raise
    ok = False
  finally:
    jax.clear_caches()
  log(f"fit: {devices} device(s), length {length}: {'fits' if ok else 'out of memory'}")
  return ok


def longest_fit(fits: Callable[[int], bool], start: int, cap: int, granularity: int) -> dict:
  """Longest length with ``fits(length)``: doubling from ``start`` while it fits (up to ``cap``),
  then bisecting between the last fit and the first failure down to ``granularity`` tokens
  (lengths stay multiples of it). Assumes that what fits at some length fits at every shorter one.

  Returns:
    ``{"longest": int or None, "first_failure": int or None, "capped": bool, "tried": {...}}``.
  """
  tried = {}
  ok, bad = 0, None
  length = start
  while length <= cap:
    tried[length] = fits(length)
    if not tried[length]:
      bad = length
      break
    ok, length = length, 2 * length
  while bad is not None and bad - ok > granularity:
    mid = (ok + bad) // 2 // granularity * granularity
    if mid <= ok:
      break
    tried[mid] = fits(mid)
    ok, bad = (mid, bad) if tried[mid] else (ok, mid)
  return dict(longest=ok or None, first_failure=bad, capped=bad is None,
              tried={str(k): v for k, v in sorted(tried.items())})


def tried_lengths(fits: Callable[[int], bool], lengths: list[int]) -> dict:
  """``longest_fit``'s record for the given lengths only: the longest that fit and the shortest
  that failed among them (``capped`` when none failed)."""
  tried = {length: fits(length) for length in sorted(lengths)}
  ok = [length for length, fit in tried.items() if fit]
  bad = [length for length, fit in tried.items() if not fit]
  return dict(longest=max(ok, default=None), first_failure=min(bad, default=None),
              capped=not bad, tried={str(k): v for k, v in tried.items()}, probed=True)


# ----------------------------------------------------------------------------------------------


def main(argv):
  del argv
  s = settings()
  n = FLAGS.devices or jax.device_count()
  harness.check_choices("parts", FLAGS.parts, {"scan", "train", "fit"})
  if n < 2 or n > jax.device_count():
    raise app.UsageError(f"--devices must be in [2, {jax.device_count()}]; got {n} (on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  if s.search_granularity % n or s.search_start % n or s.scan_shape[1] % n or s.train_length % n:
    raise app.UsageError("lengths (scan, train, search start and granularity) must be multiples "
                         f"of N={n}")
  dtype = jnp.dtype(FLAGS.dtype)
  device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
  bench = harness.Run("bench_parallel", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current,
                      device=f"{harness.device_slug()}x{jax.device_count()}", meta=dict(
                          device=device, device_count=jax.device_count(), n=n,
                          backend=FLAGS.backend, dtype=FLAGS.dtype, tiny=FLAGS.tiny,
                          repeats=FLAGS.repeats, settings=dataclasses.asdict(s), scan=[],
                          train=[], longest_fit=[]))
  for part in ("scan", "train", "fit"):  # each part saved as it ends: a cut-short run keeps it
    if part not in FLAGS.parts:
      continue
    if part == "scan":
      bench.record["scan"] = bench_scan(s, n, dtype, bench.log)
    elif part == "train":
      bench.record["train"] = bench_train(s, n, dtype, bench.log)
    else:
      for k in [int(k) for k in FLAGS.fit_devices or (1, n)]:
        fit_k = lambda length, k=k: fits(s, k, length, dtype, bench.log)
        if FLAGS.fit_lengths:
          search = lambda f=fit_k: tried_lengths(f, [int(x) for x in FLAGS.fit_lengths])
        else:
          search = lambda f=fit_k, k=k: longest_fit(f, s.search_start * k, s.search_max,
                                                    s.search_granularity)
        bench.record["longest_fit"].append(dict(devices=k, **harness.attempt(search, bench.log)))
    text = tables(bench.record)
    bench.save(text)
    bench.log(text)
  bench.log(f"\nwrote {bench.dir}")
  bench.finish()


def _ratio(base: dict, row: dict, key: str, inverse: bool = False) -> str:
  """``base[key] / row[key]`` (``row / base`` if ``inverse``) as ``1.93x``; ``-`` if either failed."""
  if base.get("status") != "ok" or row.get("status") != "ok":
    return "-"
  return f"{(row[key] / base[key]) if inverse else (base[key] / row[key]):.2f}x"


def _cell(row: dict, key: str, fmt: str) -> str:
  return format(row[key], fmt) if row.get("status") == "ok" else row.get("status", "?")


def tables(r: dict) -> str:
  """Markdown tables of the parts measured so far."""
  s = Settings(**r["settings"])
  scan_rows, train_rows, fit_rows = r["scan"], r["train"], r["longest_fit"]
  parts = []
  if scan_rows:
    b, l, d, st = s.scan_shape
    parts.append(f"Selective scan, (batch, length, d_inner, d_state) = ({b}, {l}, {d}, {st}), "
                 f"{r['dtype']}, backend {r['backend']}; {r['device']}\n")
    parts.append(plotting.markdown_table(
        ["devices", "mesh", "fwd (ms)", "fwd+bwd (ms)", "speed-up fwd", "speed-up fwd+bwd"],
        [[x["devices"], x["mesh"], _cell(x, "fwd_ms", ".3f"), _cell(x, "fwd_bwd_ms", ".3f"),
          _ratio(scan_rows[0], x, "fwd_ms"), _ratio(scan_rows[0], x, "fwd_bwd_ms")]
         for x in scan_rows]))
  if train_rows:
    parts.append(f"\nMambaLM training step (AdamW), {s.size}, length {s.train_length}, "
                 f"{r['dtype']}, backend {r['backend']}; data=N at {s.train_batch} rows per "
                 f"device, seq=N at the one-device batch; speed-up in tokens/s\n")
    parts.append(plotting.markdown_table(
        ["devices", "mesh", "global batch", "step (ms)", "tokens/s", "speed-up"],
        [[x["devices"], x["mesh"], x["batch"], _cell(x, "step_ms", ".2f"),
          _cell(x, "tokens_per_s", ",.0f"), _ratio(train_rows[0], x, "tokens_per_s", True)]
         for x in train_rows]))
  if fit_rows:
    how = ("only the lengths given were tried" if any(x.get("probed") for x in fit_rows) else
           f"doubling from {s.search_start} × devices, bisecting to {s.search_granularity}, "
           f"cap {s.search_max}")
    parts.append(f"\nLongest training sequence at batch 1 (sequence-parallel on N; {how})\n")
    parts.append(plotting.markdown_table(
        ["devices", "longest that fits", "first that failed", "vs 1 device"],
        [[x["devices"], x.get("longest") if x["status"] == "ok" else x["status"],
          (("none tried" if x.get("probed") else "none up to the cap") if x["capped"]
           else x["first_failure"])
          if x["status"] == "ok" else "-",
          f"{x['longest'] / fit_rows[0]['longest']:.2f}x"
          if x["status"] == fit_rows[0]["status"] == "ok" and x.get("longest")
          and fit_rows[0].get("longest") and fit_rows[0]["devices"] == 1 else "-"]
         for x in fit_rows]))
  return "\n".join(parts)


if __name__ == "__main__":
  app.run(main)
