"""Generation throughput of a Mamba LM against a same-size Transformer with a KV cache.

The setting of the Mamba paper's inference figure (Gu & Dao, 2023, section 4.5, Figure 8): random
weights in bfloat16, a prompt of 2048 tokens, 128 new tokens by greedy decoding, batch 1 to 128,
at the ~130M and ~1.4B shapes. One measurement times the whole generate call (prefill included),
after warm-up calls that compile it; throughput is ``batch * new_tokens / seconds``.

* Mamba: :meth:`ssmax.nn.MambaLM.generate` (parallel-scan prefill, then a jit-compiled loop of O(1)
  recurrent steps).
* Transformer: :class:`experiments.transformer.TransformerLM` (rotary, GELU MLP, tied head), whose
  KV cache is allocated for prompt + new tokens; prefill writes it (causal attention over the
  prompt alone, with XLA's attention or cuDNN's fused flash attention, ``--attention``; the head
  on the last position only), then a jit-compiled loop of one-token steps attends to it. Shapes
  follow GPT-3/Pythia: 12 layers of width 768 (~124M) and 24 layers of width 2048 (~1.3B).

Writes ``--out_dir``/bench_generate.{md,json,png}: per size a table of milliseconds and new tokens
per second with the Mamba/Transformer ratio at each batch size, and the official stack's numbers
measured on an H100 (``ANCHORS``) beside them. A configuration that runs out of device memory (or
fails otherwise) is reported as such, and larger batches of that model are not tried.

  python -m experiments.bench_generate                 # GPU: both sizes, batch 1..128
  python -m experiments.bench_generate --tiny          # CPU smoke run in seconds
"""

from __future__ import annotations

import functools
import gc
import json
import pathlib
import statistics
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax import lax

from experiments.lm_sizes import SIZES, VOCAB, vocab_size  # noqa: F401 (VOCAB re-exported)
from experiments.plotting import markdown_table
from experiments.transformer import TransformerConfig, TransformerLM
from ssmax.nn import MambaConfig, MambaLM

# The official stack on an NVIDIA H100 80GB, 2026-11-22, prompt 2048 + 128 greedy tokens, bf16,
# whole call timed: mamba_ssm's MambaLMHeadModel.generate (130M, CUDA graphs) and transformers'
# GPTNeoXForCausalLM in the Pythia-160M shape (SDPA, default KV cache).
ANCHORS = {
    "mamba_ssm 130M (H100)": {1: 175.84, 16: 145.14, 64: 266.53},
    "transformers GPT-NeoX 160M (H100)": {1: 1379.71, 16: 1523.61, 64: 1911.63},
}

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU smoke run: tiny shapes, prompt 9, 5 new tokens, batch 1, 3.")
flags.DEFINE_list("sizes", ["130m", "1.4b"], f"Model sizes, from {sorted(SIZES)}.")
flags.DEFINE_list("models", ["mamba", "transformer"], "Models to time: mamba, transformer.")
flags.DEFINE_list("batches", ["1", "2", "4", "8", "16", "32", "64", "128"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 2048, "Prompt length.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated after the prompt.")
flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls first (they compile).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
flags.DEFINE_string("scan_backend", "auto", "Mamba's selective scan backend (prefill).")
flags.DEFINE_string("out_dir", "runs/bench_generate", "Output directory.")
flags.DEFINE_float("max_minutes", None, "Start no new configuration after this many minutes.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                  "The Transformer's prefill attention: xla (materialises the scores), cudnn "
                  "(fused flash attention, the README's H100 tables), auto: cudnn on a GPU in "
                  "bf16/fp16, else xla.")
flags.DEFINE_bool("split_prefill", False,
                  "Also time a call that generates one token (the prefill), and report the "
                  "decode cost per token as (whole - prefill) / (new_tokens - 1).")


def attention_impl(choice: str, dtype) -> str:
  if choice != "auto":
    return choice
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def build(model: str, size: str, dtype, scan_backend: str = "auto", seed: int = 0,
          attention: str = "xla"):
  """A randomly initialised model of ``size``; returns ``(module, parameter count)``."""
  rngs = nnx.Rngs(seed)
  shape = SIZES[size][model]
  vocab = vocab_size(size)
  if model == "mamba":
    module = MambaLM(MambaConfig(vocab_size=vocab, dtype=dtype, param_dtype=dtype,
                                 scan_backend=scan_backend, **shape), rngs=rngs)
  elif model == "transformer":
    vocab = MambaConfig(vocab_size=vocab).padded_vocab_size  # same embedding as Mamba's
    module = TransformerLM(TransformerConfig(vocab_size=vocab, dtype=dtype, param_dtype=dtype,
                                             attention=attention,
                                             **shape), rngs=rngs)
  else:
    raise ValueError(f"model must be 'mamba' or 'transformer'; got {model!r}")
  params = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  return module, params


def transformer_generate(model: TransformerLM, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
  """Greedy continuation with a KV cache: ``prompt`` ``(batch, length)`` int ->
  ``(batch, length + max_new_tokens)`` int32."""
  graphdef, state = nnx.split(model)
  return _transformer_generate(graphdef, state, jnp.asarray(prompt, jnp.int32),
                               max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _transformer_generate(graphdef, state, prompt, *, max_new_tokens):
  model = nnx.merge(graphdef, state)
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + max_new_tokens)
  logits, cache = model(prompt, cache, fresh=True, last_only=True)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def body(carry, _):
    cache, token = carry
    logits, cache = model.step(token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (cache, token), token

  _, rest = lax.scan(body, (cache, first), None, length=max_new_tokens - 1)
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate_fn(model: str, module) -> Callable[[jax.Array, int], jax.Array]:
  if model == "mamba":
    return lambda prompt, n: module.generate(prompt, n)
  return functools.partial(transformer_generate, module)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
  """Median seconds of ``fn()`` (blocked until ready) over ``repeats`` calls after ``warmup``.

  Two warm-up calls by default: with ``scan_backend="pallas"`` the second call was seen to
  compile again.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run(*, sizes, models, batches, prompt_len, new_tokens, repeats, dtype, scan_backend,
        out_dir, warmup=2, max_minutes=None, split_prefill=False, attention="xla",
        log=print) -> dict:
  """Times every (size, model, batch) and returns the JSON dict.

  The Markdown table, JSON and PNG in ``out_dir`` are rewritten after every configuration, so a
  sweep cut short keeps what it measured; after ``max_minutes`` no new configuration starts.
  """
  deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
  if prompt_len < 1 or new_tokens < 1:
    raise ValueError(f"prompt_len and new_tokens must be >= 1; got {prompt_len}, {new_tokens}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, dtype=jnp.dtype(dtype).name, scan_backend=scan_backend,
                attention=attention_impl(attention, dtype),
                prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                rows=rows,
                ratios=[], anchors_ms={k: {str(b): ms for b, ms in v.items()}
                                       for k, v in ANCHORS.items()})
  for size in sizes:
    for model in models:
      module = generate = params = failed = None
      for batch in batches:
        row = dict(size=size, model=model, params=params, batch=batch, prompt_len=prompt_len,
                   new_tokens=new_tokens)
        if deadline is not None and time.monotonic() > deadline:
          row.update(status="not run (time budget)", ms=None, tokens_per_s=None)
          rows.append(row)
          continue
        if module is None:  # built only when a configuration runs
          module, params = build(model, size, dtype, scan_backend,
                                 attention=result["attention"])
          generate = generate_fn(model, module)
          row["params"] = params
        if failed:
          row.update(status=f"skipped after {failed}", ms=None, tokens_per_s=None)
        else:
          prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                                      vocab_size(size))
          try:
            seconds = time_call(lambda: generate(prompt, new_tokens), repeats, warmup)
            row.update(status="ok", ms=1e3 * seconds, tokens_per_s=batch * new_tokens / seconds)
            if split_prefill and new_tokens > 1:
              prefill = time_call(lambda: generate(prompt, 1), repeats, warmup)
              row.update(prefill_ms=1e3 * prefill,
                         decode_ms_per_token=1e3 * (seconds - prefill) / (new_tokens - 1))
          except Exception as e:  # keep the rest of the sweep; larger batches would fail too
            status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
            if status != "OOM":
              log(traceback.format_exc())
            failed = f"{status.split(':')[0]} at batch {batch}"
            row.update(status=status, ms=None, tokens_per_s=None)
        rows.append(row)
        result["ratios"] = ratios(rows)
        write(result, out_dir)
        log(f"{size:>5} {model:<11} batch {batch:>3}: " + (
            f"{row['ms']:9.1f} ms {row['tokens_per_s']:11.1f} tok/s" if row["ms"]
            else row["status"]))
      del module, generate
      gc.collect()
  write(result, out_dir)
  log("\n" + tables(result) + f"\n\nwrote {out_dir}/bench_generate.{{md,json,png}}")
  return result


def write(result, out_dir: pathlib.Path) -> None:
  (out_dir / "bench_generate.json").write_text(json.dumps(result, indent=1))
  (out_dir / "bench_generate.md").write_text(tables(result) + "\n")
  plot(result, out_dir / "bench_generate.png")


def ratios(rows) -> list[dict]:
  """Mamba/Transformer throughput ratio per (size, batch) where both ran."""
  by = {(r["size"], r["model"], r["batch"]): r for r in rows}
  out = []
  for (size, model, batch), r in by.items():
    t = by.get((size, "transformer", batch))
    if model == "mamba" and t and r["tokens_per_s"] and t["tokens_per_s"]:
      out.append(dict(size=size, batch=batch, ratio=r["tokens_per_s"] / t["tokens_per_s"]))
  return out


def tables(result) -> str:
  rows = result["rows"]
  ratio = {(q["size"], q["batch"]): q["ratio"] for q in result["ratios"]}
  fmt = lambda v, spec: None if v is None else format(v, spec)
  parts = [f"Generation, prompt {result['prompt_len']} + {result['new_tokens']} greedy tokens, "
           f"{result['dtype']}, whole call timed (median of {result['repeats']}), "
           f"Transformer prefill attention: {result.get('attention', 'xla')}, "
           f"{result['device']}."]
  for size in dict.fromkeys(r["size"] for r in rows):
    cell = {(r["model"], r["batch"]): r for r in rows if r["size"] == size}
    models = list(dict.fromkeys(r["model"] for r in rows if r["size"] == size))
    params = {r["model"]: r["params"] for r in rows if r["size"] == size and r["params"]}
    head = ["batch"]
    for m in models:
      head += [f"{m} ({count(params[m])}) ms" if m in params else f"{m} ms", f"{m} tok/s"]
    head.append("Mamba/Transformer")
    body = []
    for batch in dict.fromkeys(r["batch"] for r in rows if r["size"] == size):
      line = [batch]
      for m in models:
        r = cell.get((m, batch))
        if r is None:  # not run yet
          line += [None, None]
        else:
          line += [fmt(r["ms"], ".1f") if r["ms"] else r["status"], fmt(r["tokens_per_s"], ".0f")]
      line.append(fmt(ratio.get((size, batch)), ".2f"))
      body.append(line)
    parts.append(f"\n{size}\n\n" + markdown_table(head, body))
  split = [r for r in rows if r.get("prefill_ms") is not None]
  if split:
    parts.append("\nWhere the time goes (prefill = a call that generates one token):\n\n" +
                 markdown_table(["size", "model", "batch", "prefill ms", "decode ms/token"],
                                [[r["size"], r["model"], r["batch"], f"{r['prefill_ms']:.1f}",
                                  f"{r['decode_ms_per_token']:.3f}"] for r in split]))
  anchor_rows = [[name, b, f"{ms:.1f}", f"{b * 128 / ms * 1e3:.0f}"]
                 for name, by_batch in ANCHORS.items() for b, ms in by_batch.items()]
  parts.append("\nOfficial stack, same setting (prompt 2048 + 128, H100):\n\n" +
               markdown_table(["model", "batch", "ms", "tok/s"], anchor_rows))
  return "\n".join(parts)


def count(n: int) -> str:
  """Parameter count as ``1.37B``, ``129M`` or ``51K``."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(n)


def plot(result, path) -> None:
  """Throughput against batch size, bars per model and size (the paper's Figure 8 layout)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in result["rows"] if r["tokens_per_s"]]
  series = list(dict.fromkeys((r["size"], r["model"]) for r in result["rows"]))
  batches = list(dict.fromkeys(r["batch"] for r in result["rows"]))
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for i, (size, model) in enumerate(series):
    got = {r["batch"]: r["tokens_per_s"] for r in rows if (r["size"], r["model"]) == (size, model)}
    xs = [j + (i - (len(series) - 1) / 2) * width for j, b in enumerate(batches) if b in got]
    ax.bar(xs, [got[b] for b in batches if b in got], width, label=f"{model} {size}",
           color=f"C{i}")
  same_setting = (result["prompt_len"], result["new_tokens"]) == (2048, 128)
  if same_setting and any(size == "130m" for size, _ in series):  # the official stack's numbers
    for k, (name, by_batch) in enumerate(ANCHORS.items()):
      pts = [(batches.index(b), b * 128 / ms * 1e3) for b, ms in by_batch.items() if b in batches]
      ax.plot([x for x, _ in pts], [y for _, y in pts], ["k*", "kx"][k % 2], ms=8, label=name)
  ax.set_xticks(range(len(batches)))
  ax.set_xticklabels([str(b) for b in batches])
  ax.set_yscale("log")
  ax.set(xlabel="batch size", ylabel="new tokens / s",
         title=f"Generation throughput, prompt {result['prompt_len']} + {result['new_tokens']} "
               f"({result['device']})")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  if FLAGS.tiny:
    kw = dict(sizes=["tiny"], batches=[1, 3], prompt_len=9, new_tokens=5, repeats=1,
              split_prefill=True)
  else:
    for s in FLAGS.sizes:
      if s not in SIZES:
        raise app.UsageError(f"--sizes must be from {sorted(SIZES)}; got {s!r}")
    kw = dict(sizes=FLAGS.sizes, batches=[int(b) for b in FLAGS.batches],
              prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats,
              split_prefill=FLAGS.split_prefill)
  for m in FLAGS.models:
    if m not in ("mamba", "transformer"):
      raise app.UsageError(f"--models must be from ['mamba', 'transformer']; got {m!r}")
  run(models=FLAGS.models, dtype=jnp.dtype(FLAGS.dtype), scan_backend=FLAGS.scan_backend,
      out_dir=FLAGS.out_dir, warmup=FLAGS.warmup, max_minutes=FLAGS.max_minutes,
      attention=FLAGS.attention, **kw)


if __name__ == "__main__":
  app.run(main)
