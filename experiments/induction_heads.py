r"""Induction Heads (Mamba paper, section 4.1.2, Table 2): train short, test up to 4000x longer.

    python -m experiments.induction_heads --preset=quick          # CPU, a few minutes
    python -m experiments.induction_heads --preset=paper          # train at 256, test 2^6 .. 2^20

Trains each model of ``--models`` at the preset's length, then measures accuracy at every power of
two from ``2^min_test_log2`` to ``2^max_test_log2``. Long sequences are read in chunks of
``--eval_chunk`` tokens, carrying Mamba's recurrent state (or the Transformer's KV cache), so memory
is bounded by the chunk, not the length; attention is quadratic, so the Transformers are only tested
up to ``--transformer_max_test_length`` (longer lengths print as a dash). Writes ``results.md``,
``results.json``, ``accuracy_vs_length.png`` (log2 axis), ``accuracy_vs_step.png`` and per-model
metrics and checkpoints into ``--out_dir``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
from absl import app, flags

from experiments import cli, models, plotting, tasks, train


@dataclasses.dataclass(frozen=True)
class Preset(cli.Preset):
  """The common preset, plus how the trained models are tested at longer lengths."""

  min_test_log2: int
  max_test_log2: int
  test_examples: int  # per length, at most
  test_tokens: int  # per length, at most: long lengths get fewer examples (at least one)
  eval_chunk: int
  eval_batch_tokens: int  # tokens per forward pass when testing
  transformer_max_test_length: int


PRESETS = {
    "quick": Preset(task=tasks.InductionHeads(length=64, vocab_size=16),
                    shape=models.ModelShape(vocab_size=16, d_model=32, n_layer=2, d_state=16, n_head=4,
                                            max_len=2**12, scan_backend="sequential"),
                    models=("mamba_s6", "mha_abs"), steps=1200, batch_size=32, learning_rate=3e-3,
                    log_every=50, eval_every=400, eval_examples=256, checkpoint_every=0,
                    min_test_log2=6, max_test_log2=16, test_examples=128, test_tokens=2**18,
                    eval_chunk=2**12, eval_batch_tokens=2**15, transformer_max_test_length=2**12),
    # Appendix E.1: vocabulary 16, train length 256, batch 8, constant lr 1e-3, 2 layers, D = 64;
    # 25 "epochs" of 8192 steps (the paper's Mamba and MHA-Abs; MHA-RoPE had 50).
    "paper": Preset(task=tasks.InductionHeads(length=256, vocab_size=16),
                    shape=models.ModelShape(vocab_size=16, d_model=64, n_layer=2, d_state=16, n_head=8,
                                            max_len=2**14),
                    models=("mamba_s6", "mha_abs", "mha_rope"), steps=8192 * 25, batch_size=8,
                    learning_rate=1e-3, log_every=256, eval_every=8192, eval_examples=512,
                    checkpoint_every=8192, min_test_log2=6, max_test_log2=20, test_examples=256,
                    test_tokens=2**22, eval_chunk=2**13, eval_batch_tokens=2**18,
                    transformer_max_test_length=2**14),
}


# Attention scores per test forward pass, at most (256 MiB in float32).
ATTENTION_SCORES = 2**26


def test_lengths(preset: Preset) -> list[int]:
  return [2**k for k in range(preset.min_test_log2, preset.max_test_log2 + 1)]


def accuracy_by_length(model, name: str, preset: Preset, seed: int) -> dict[int, float | None]:
  """Accuracy at every test length (``None`` past the Transformer's limit)."""
  out = {}
  for length in test_lengths(preset):
    if name in models.TRANSFORMER_MODELS and length > preset.transformer_max_test_length:
      out[length] = None
      continue
    examples = max(1, min(preset.test_examples, preset.test_tokens // length))
    per_pass = min(length, preset.eval_chunk)
    batch = max(1, min(examples, preset.eval_batch_tokens // per_pass))
    if name in models.TRANSFORMER_MODELS:  # attention scores (batch, heads, chunk, length)
      batch = max(1, min(batch, ATTENTION_SCORES // (preset.shape.n_head * per_pass * length)))
    key = jax.random.fold_in(jax.random.key(seed + 1_000_003), length)
    accuracy, _ = train.evaluate(model, preset.task.with_length(length), key, examples, batch,
                                 chunk=preset.eval_chunk)
    out[length] = accuracy
  return out


def run(preset: Preset, out_dir: str | Path, *, seed: int = 0, resume: bool = False,
        progress: bool = True) -> dict:
  """Trains and tests every model of ``preset``; writes table, JSON and plots; returns results."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  results, histories, curves = {}, {}, {}
  for name in preset.models:
    res = cli.train_model(preset, name, out_dir, seed=seed, resume=resume, progress=progress)
    t_eval = time.perf_counter()
    by_length = accuracy_by_length(res.model, name, preset, seed)
    label = models.LABELS[name]
    histories[label], curves[label] = res.records, by_length
    results[name] = {"label": label, "params": models.count_params(res.model), "steps": preset.steps,
                     "train_accuracy": res.final_accuracy, "train_seconds": round(res.train_seconds, 1),
                     "test_seconds": round(time.perf_counter() - t_eval, 1),
                     "accuracy_by_length": {str(k): v for k, v in by_length.items()}}
  lengths = test_lengths(preset)
  pct = lambda a: None if a is None else f"{100 * a:.1f}"
  rows = [[r["label"], f"{r['params']:,}"] + [pct(curves[r["label"]][l]) for l in lengths]
          for r in results.values()]
  table = plotting.markdown_table(["Model", "Params"] + [f"2^{l.bit_length() - 1}" for l in lengths], rows)
  task = preset.task
  header = (f"Induction Heads: vocabulary {task.vocab_size}, trained at length {task.length} for "
            f"{preset.steps} steps (batch {preset.batch_size}, Adam lr {preset.learning_rate}, "
            f"{preset.shape.n_layer} layers, d_model {preset.shape.d_model}, seed {seed}, "
            f"{cli.devices()}); accuracy (%) at each test length. Chance: "
            f"{100 * task.chance_accuracy:.1f}%. A dash: not run (quadratic attention).")
  cli.write_results(out_dir, preset, seed, results, t_start, f"{header}\n\n{table}")
  plotting.plot_accuracy_vs_length(curves, out_dir / "accuracy_vs_length.png",
                                   title="Induction Heads: length extrapolation",
                                   train_length=task.length, chance=task.chance_accuracy)
  plotting.plot_accuracy_vs_step(histories, out_dir / "accuracy_vs_step.png",
                                 title=f"Induction Heads (train length {task.length})",
                                 chance=task.chance_accuracy)
  print(f"\n{header}\n\n{table}\n\nwrote {out_dir}/results.md, results.json, accuracy_vs_length.png, "
        "accuracy_vs_step.png")
  return results


FLAGS = flags.FLAGS
cli.define_flags("induction_heads", PRESETS, models.MODEL_NAMES)
flags.DEFINE_integer("max_test_log2", None, "Test up to length 2^this; default: the preset's.")
flags.DEFINE_integer("eval_chunk", None, "Tokens read per chunk at long test lengths; default: the preset's.")
flags.DEFINE_integer("transformer_max_test_length", None, "Longest length the Transformers are tested "
                     "at; default: the preset's.")
flags.DEFINE_bool("pack", False, "Train on rows that pack --pack_documents examples of mixed lengths "
                  "(tasks.PackedInductionHeads, segment_ids); Mamba-family models only. Testing is "
                  "unchanged (one example per row).")
flags.DEFINE_integer("pack_documents", 4, "Examples per training row with --pack.")


def preset_from_flags() -> Preset:
  preset = PRESETS[FLAGS.preset]
  changes = cli.preset_changes(preset, models.MODEL_NAMES,
                               ("max_test_log2", "eval_chunk", "transformer_max_test_length"))
  if "transformer_max_test_length" in changes:
    changes["shape"] = dataclasses.replace(changes.get("shape", preset.shape),
                                           max_len=max(changes["transformer_max_test_length"],
                                                       preset.task.length))
  preset = dataclasses.replace(preset, **changes)
  if FLAGS.pack:
    attention = [m for m in preset.models if m in models.TRANSFORMER_MODELS]
    if attention:
      raise app.UsageError(f"--pack trains Mamba-family models only (they take segment_ids); "
                           f"drop {attention} from --models")
    length, documents = preset.task.length, FLAGS.pack_documents
    if documents < 1 or 3 * documents > length:
      raise app.UsageError(f"--pack_documents must be in [1, {length // 3}] for length {length}; "
                           f"got {documents}")
    preset = dataclasses.replace(preset, task=tasks.PackedInductionHeads(
        length=length, vocab_size=preset.task.vocab_size, documents=documents,
        min_length=max(3, length // (4 * documents))))
  return preset


def main(argv):
  del argv
  cli.main("induction_heads", run, preset_from_flags())


if __name__ == "__main__":
  app.run(main)
