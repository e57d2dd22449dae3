"""What one decode step of generation launches on an H100 or H200, read from XLA's compiled HLO on a
machine without a GPU (how: :mod:`benchmarks.xla_offline`): the kernels of the decode loop's body,
by kind, with the bytes their operands and results hold. Nothing runs; no timing comes from this.

A decode step at batch 64 moves little data (the 130M Mamba's weights and states: ~0.4 GB, ~0.1 ms
at an H200's bandwidth) and launches hundreds of small kernels, so their number is what this
counts. The products' tilings are XLA's untuned defaults (autotuning needs a GPU); which fusions
exist, and so how many kernels, is decided before tuning.

  python -m benchmarks.hlo_report --sizes=130m,1.4b --models=mamba,transformer --batches=64

With a GPU's own description and the tilings a run on it tuned, the products are the GPU's too: on
the GPU machine, ``python -m benchmarks.hlo_report --write_target=gpu.txtpb`` and any run with
``XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=atcache``; then, here,
``--target=gpu.txtpb --xla_options='xla_gpu_per_fusion_autotune_cache_dir=atcache'``.

The compiled function is what ``bench_generate`` times: ``ssmax.nn.generate`` (Mamba) and
``experiments.transformer.generate``, with a short prompt (the decode loop's body does not depend
on its length). The first run downloads the CUDA plugin (:func:`benchmarks.sass.toolchain`).
"""

from __future__ import annotations

import importlib
import json
import pathlib
import tempfile

from absl import app, flags

from benchmarks import harness, sass, xla_offline
from benchmarks.lm_sizes import SIZES

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["130m", "1.4b"], f"Model sizes: {', '.join(SIZES)}.")
flags.DEFINE_list("models", ["mamba", "transformer"], "mamba and/or transformer.")
flags.DEFINE_list("batches", ["64"], "Batch sizes.")
flags.DEFINE_string("target", "h200", "The GPU compiled for: h100, h200, or a GpuTargetConfig text "
                    "proto file, as --write_target writes it on a GPU machine (with it, "
                    "--xla_options='xla_gpu_per_fusion_autotune_cache_dir=DIR' reuses the tilings "
                    "a GPU run cached in DIR).")
flags.DEFINE_string("write_target", None, "On a GPU machine: write its GpuTargetConfig to this file "
                    "and exit.")
flags.DEFINE_string("attention", "cudnn", "The Transformer's attention (bench_generate's flag).")
flags.DEFINE_integer("new_tokens", 8, "Tokens generated: the decode loop runs new_tokens - 1 times.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length (the decode step does not depend on it).")
flags.DEFINE_string("xla_options", "", "XLA options for the compile (jax.jit's compiler_options), "
                    "name=value items separated by ';', e.g. "
                    "'xla_gpu_enable_command_buffer=FUSION,CUBLAS;xla_gpu_graph_min_graph_size=1'.")
flags.DEFINE_string("toolchain", str(pathlib.Path.home() / ".cache" / "ssmax-sass"),
                    "Where the CUDA plugin and the stand-in driver are kept (benchmarks.sass).")
flags.DEFINE_string("worker", None, "Internal: compile one configuration (JSON) in this process.")
harness.define_flags(flags)


def compile_decode(v: dict) -> dict:
  """Compiles ``v``'s generation for ``v["target"]`` and returns its decode loop's kernels."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import lm_sizes
  from experiments import transformer

  # The module (ssmax.nn's attribute of that name is the function).
  mamba_generate = importlib.import_module("ssmax.nn.generate")

  sharding = xla_offline.replicated_sharding(v["target"])
  extra = {} if v["model"] == "mamba" else dict(attention=v["attention"])
  model = nnx.eval_shape(lambda: lm_sizes.build(v["model"], v["size"], dtype=jnp.bfloat16,
                                                **extra))
  model = xla_offline.abstract(model, sharding)
  prompt = jax.ShapeDtypeStruct((v["batch"], v["prompt_len"]), jnp.int32, sharding=sharding)
  n = v["new_tokens"]
  if v["model"] == "mamba":
    key = xla_offline.abstract(jax.eval_shape(lambda: jax.random.key(0)), sharding)
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)
    lowered = mamba_generate._generate.lower(model, prompt, key, temperature, None,
                                             max_new_tokens=n, greedy=True, top_k=None, top_p=None)
  else:
    lowered = transformer._generate.lower(model, prompt, max_new_tokens=n)
  hlo = lowered.compile(compiler_options=v["xla_options"] or None).as_text()
  body = xla_offline.loop_body(hlo, n - 1)
  return dict(kernels=xla_offline.kernels(hlo, body))


def worker(spec: str) -> None:
  v = json.loads(spec)
  pathlib.Path(v["out"]).write_text(json.dumps(compile_decode(v)))


def compile_variant(v: dict, tools: dict) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "kernels.json"
    harness.run_worker("benchmarks.hlo_report", dict(v, out=str(out)),
                       xla_offline.compile_env(tools))
    return json.loads(out.read_text())


def tables(rows: list[dict], target: str) -> str:
  kinds = sorted({k for r in rows for k in r["summary"]["by_kind"]},
                 key=lambda k: -sum(r["summary"]["by_kind"].get(k, {}).get("kernels", 0)
                                    for r in rows))
  bw = xla_offline.bandwidth(target) / 1e12
  lines = [f"Kernels a decode step launches (compiled for {target}, no GPU) and the bytes their "
           f"operands and results hold (an upper bound on the traffic), with that traffic's time "
           f"at {bw:.2f} TB/s.", "",
           "| size | model | batch | kernels | " + " | ".join(kinds) + " | MB | µs at bandwidth |",
           "|---|---|---|---|" + "---|" * len(kinds) + "---|---|"]
  for r in rows:
    s = r["summary"]
    lines.append(f"| {r['size']} | {r['model']} | {r['batch']} | {s['kernels']} | " + " | ".join(
        str(s["by_kind"].get(k, {}).get("kernels", 0)) for k in kinds) +
        f" | {s['bytes'] / 1e6:.0f} | {s['bandwidth_us']:.0f} |")
  for r in rows:
    lines += ["", f"{r['size']} {r['model']} batch {r['batch']}, kernels by name (XLA's numbering "
              "dropped):", "", "| kernel | count |", "|---|---|"]
    lines += [f"| `{name}` | {count} |" for name, count in r["summary"]["by_family"].items()]
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  if FLAGS.write_target:
    print(xla_offline.write_target_config(FLAGS.write_target))
    return
  xla_offline.target_config(FLAGS.target)  # a bad --target fails here, not in a worker
  harness.check_choices("sizes", FLAGS.sizes, SIZES)
  harness.check_choices("models", FLAGS.models, ("mamba", "transformer"))
  batches = [int(b) for b in FLAGS.batches]
  if FLAGS.new_tokens < 2 or FLAGS.prompt_len < 1:
    raise app.UsageError("--new_tokens must be >= 2 (a decode loop) and --prompt_len >= 1")
  items = [o.strip() for o in FLAGS.xla_options.split(";") if o.strip()]
  if any("=" not in o for o in items):
    raise app.UsageError(f"--xla_options takes name=value items; got {FLAGS.xla_options!r}")
  xla_options = {k.strip(): harness.parse_value(v.strip())
                 for k, v in (o.split("=", 1) for o in items)}
  tools = sass.toolchain(pathlib.Path(FLAGS.toolchain).expanduser())
  run = harness.Run("hlo_report", results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir,
                    tag=FLAGS.tag, current=FLAGS.current,
                    device=f"{pathlib.Path(FLAGS.target).stem}-offline",
                    meta=dict(device=f"{FLAGS.target}, compiled offline (no GPU)"))
  rows = run.record["rows"] = []
  bandwidth = xla_offline.bandwidth(FLAGS.target)
  for size in FLAGS.sizes:
    for model in FLAGS.models:
      for batch in batches:
        v = dict(size=size, model=model, batch=batch, target=FLAGS.target,
                 attention=FLAGS.attention, new_tokens=FLAGS.new_tokens,
                 prompt_len=FLAGS.prompt_len, xla_options=xla_options)
        ks = compile_variant(v, tools)["kernels"]
        summary = xla_offline.summary(ks, bandwidth)
        rows.append(dict(v, summary=summary, kernels=ks))
        run.log(f"{size} {model} batch {batch}: {summary['kernels']} kernels a step, "
                f"{summary['bytes'] / 1e6:.0f} MB, {summary['bandwidth_us']:.0f} µs at bandwidth")
        run.save(tables(rows, FLAGS.target))
  run.log("\n" + tables(rows, FLAGS.target))
  run.finish("Compiled offline (no GPU): kernel counts and static bytes, not timings; the "
             "products' tilings are XLA's untuned defaults (benchmarks/xla_offline.py).")


if __name__ == "__main__":
  app.run(main)
