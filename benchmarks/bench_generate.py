"""Generation throughput of a Mamba LM against a same-size Transformer with a KV cache.

The setting of the Mamba paper's inference figure (Gu & Dao, 2023, section 4.5, Figure 8): random
weights in bfloat16, a prompt of 2048 tokens, 128 new tokens by greedy decoding, batch 1 to 128,
at the ~130M and ~1.4B shapes. One measurement times the whole generate call (prefill included),
after warm-up calls that compile it; throughput is ``batch * new_tokens / seconds``.

* Mamba: :meth:`ssmax.nn.MambaLM.generate` (parallel-scan prefill, then a jit-compiled loop of O(1)
  recurrent steps).
* Transformer: :func:`experiments.transformer.generate` on a :class:`~experiments.transformer.TransformerLM`
  (rotary, GELU MLP, tied head), whose KV cache is allocated for prompt + new tokens; prefill writes it (causal attention over the
  prompt alone, with XLA's attention or cuDNN's fused flash attention, ``--attention``; the head
  on the last position only), then a jit-compiled loop of one-token steps attends to it. Shapes
  follow GPT-3/Pythia: 12 layers of width 768 (~124M) and 24 layers of width 2048 (~1.3B).

Writes ``results/bench_generate/<date>_<device>/bench_generate.{md,json,png,log}`` (see
:mod:`benchmarks.harness`): per size a table of milliseconds and new tokens
per second with the Mamba/Transformer ratio at each batch size, and the official stack's numbers
measured on an H100 (``ANCHORS``) beside them. A configuration that runs out of device memory (or
fails otherwise) is reported as such, and larger batches of that model are not tried.

  python -m benchmarks.bench_generate                 # GPU: both sizes, batch 1..128
  python -m benchmarks.bench_generate --tiny          # CPU smoke run in seconds
"""

from __future__ import annotations

import gc
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import harness
from benchmarks.lm_sizes import MODELS, SIZES, build, param_count, vocab_size
from experiments import plotting
from experiments import transformer

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
flags.DEFINE_list("models", list(MODELS), "Models to time: mamba, transformer.")
flags.DEFINE_list("batches", ["1", "2", "4", "8", "16", "32", "64", "128"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 2048, "Prompt length.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated after the prompt.")
flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls first (they compile).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
flags.DEFINE_string("scan_backend", "auto", "Mamba's selective scan backend (prefill).")
flags.DEFINE_float("max_minutes", None, "Start no new configuration after this many minutes.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                  "The Transformer's prefill attention: xla (materialises the scores), cudnn "
                  "(fused flash attention, the H100 tables of docs/results.md), auto: cudnn on a "
                  "GPU in bf16/fp16, else xla.")
flags.DEFINE_bool("split_prefill", False,
                  "Also time a call that generates one token (the prefill), and report the "
                  "decode cost per token as (whole - prefill) / (new_tokens - 1).")
harness.define_flags(flags)


def attention_impl(choice: str, dtype) -> str:
  if choice != "auto":
    return choice
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def generate_fn(model: str, module) -> Callable[[jax.Array, int], jax.Array]:
  if model == "mamba":
    return lambda prompt, n: module.generate(prompt, n)
  return lambda prompt, n: transformer.generate(module, prompt, n)


def run(bench: harness.Run, *, sizes, models, batches, prompt_len, new_tokens, repeats, dtype,
        scan_backend, warmup=2, max_minutes=None, split_prefill=False, attention="xla") -> dict:
  """Times every (size, model, batch) into ``bench.record`` and returns it.

  The run's files are rewritten after every configuration. A configuration that fails (OOM or
  otherwise) is recorded as such and larger batches of that model are skipped.
  """
  if prompt_len < 1 or new_tokens < 1:
    raise ValueError(f"prompt_len and new_tokens must be >= 1; got {prompt_len}, {new_tokens}")
  deadline = harness.Deadline(max_minutes)
  rows = []
  result = bench.record
  result.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                dtype=jnp.dtype(dtype).name, scan_backend=scan_backend,
                attention=attention_impl(attention, dtype), prompt_len=prompt_len,
                new_tokens=new_tokens, repeats=repeats, warmup=warmup, rows=rows, ratios=[],
                anchors_ms={k: {str(b): ms for b, ms in v.items()} for k, v in ANCHORS.items()})
  for size in sizes:
    for model in models:
      module = generate = params = failed = None
      for batch in batches:
        row = dict(size=size, model=model, params=params, batch=batch, prompt_len=prompt_len,
                   new_tokens=new_tokens, ms=None, tokens_per_s=None)
        if deadline.passed():
          row["status"] = "not run (time budget)"
        elif failed:
          row["status"] = f"skipped after {failed}"
        else:
          if module is None:  # built only when a configuration runs
            extra = (dict(scan_backend=scan_backend) if model == "mamba"
                     else dict(attention=result["attention"]))
            module = build(model, size, dtype=dtype, **extra)
            generate, params = generate_fn(model, module), param_count(module)
            row["params"] = params
          prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                                      vocab_size(size))
          row.update(harness.attempt(lambda: measure(generate, prompt, batch, new_tokens, repeats,
                                                     warmup, split_prefill), bench.log))
          if row["status"] != "ok":  # larger batches would fail too
            failed = f"{row['status'].split(':')[0]} at batch {batch}"
        rows.append(row)
        result["ratios"] = ratios(rows)
        bench.save(tables(result), plot)
        bench.log(f"{size:>5} {model:<11} batch {batch:>3}: " + (
            f"{row['ms']:9.1f} ms {row['tokens_per_s']:11.1f} tok/s" if row["ms"]
            else row["status"]))
      del module, generate
      gc.collect()
  bench.log("\n" + tables(result) + f"\n\nwrote {bench.dir}")
  return result


def measure(generate, prompt, batch, new_tokens, repeats, warmup, split_prefill) -> dict:
  seconds = harness.median_seconds(lambda: generate(prompt, new_tokens), repeats=repeats,
                                   warmup=warmup)
  out = dict(ms=1e3 * seconds, tokens_per_s=batch * new_tokens / seconds)
  if split_prefill and new_tokens > 1:
    prefill = harness.median_seconds(lambda: generate(prompt, 1), repeats=repeats, warmup=warmup)
    out.update(prefill_ms=1e3 * prefill,
               decode_ms_per_token=1e3 * (seconds - prefill) / (new_tokens - 1))
  return out


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
      head += [f"{m} ({harness.count(params[m])}) ms" if m in params else f"{m} ms", f"{m} tok/s"]
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
    parts.append(f"\n{size}\n\n" + plotting.markdown_table(head, body))
  split = [r for r in rows if r.get("prefill_ms") is not None]
  if split:
    parts.append("\nWhere the time goes (prefill = a call that generates one token):\n\n" +
                 plotting.markdown_table(
                     ["size", "model", "batch", "prefill ms", "decode ms/token"],
                     [[r["size"], r["model"], r["batch"], f"{r['prefill_ms']:.1f}",
                       f"{r['decode_ms_per_token']:.3f}"] for r in split]))
  anchor_rows = [[name, b, f"{ms:.1f}", f"{b * 128 / ms * 1e3:.0f}"]
                 for name, by_batch in ANCHORS.items() for b, ms in by_batch.items()]
  parts.append("\nOfficial stack, same setting (prompt 2048 + 128, H100):\n\n" +
               plotting.markdown_table(["model", "batch", "ms", "tok/s"], anchor_rows))
  return "\n".join(parts)


def plot(result, path) -> None:
  """Throughput against batch size, bars per model and size (the paper's Figure 8 layout)."""
  rows = [r for r in result["rows"] if r["tokens_per_s"]]
  series = list(dict.fromkeys((r["size"], r["model"]) for r in result["rows"]))
  batches = list(dict.fromkeys(r["batch"] for r in result["rows"]))
  width = 0.8 / max(len(series), 1)
  fig, ax = plotting.subplots(figsize=(7.5, 4.2))
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
  if rows:  # a log axis needs data; a sweep where everything failed still gets its figure
    ax.set_yscale("log")
  ax.set(xlabel="batch size", ylabel="new tokens / s",
         title=f"Generation throughput, prompt {result['prompt_len']} + {result['new_tokens']} "
               f"({result['device']})")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  plotting.save(fig, path)


def main(argv):
  del argv
  if FLAGS.tiny:
    kw = dict(sizes=["tiny"], batches=[1, 3], prompt_len=9, new_tokens=5, repeats=1,
              split_prefill=True)
  else:
    harness.check_choices("sizes", FLAGS.sizes, SIZES)
    kw = dict(sizes=FLAGS.sizes, batches=[int(b) for b in FLAGS.batches],
              prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats,
              split_prefill=FLAGS.split_prefill)
  harness.check_choices("models", FLAGS.models, MODELS)
  bench = harness.Run("bench_generate", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                      tag=FLAGS.tag, current=FLAGS.current)
  run(bench, models=FLAGS.models, dtype=jnp.dtype(FLAGS.dtype), scan_backend=FLAGS.scan_backend,
      warmup=FLAGS.warmup, max_minutes=FLAGS.max_minutes, attention=FLAGS.attention, **kw)
  bench.finish()


if __name__ == "__main__":
  app.run(main)
