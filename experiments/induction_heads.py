r"""Induction Heads (Mamba paper, section 4.1.2, Table 2): train short, test up to 4000x longer.

    python -m experiments.induction_heads --preset=quick          # CPU, a few minutes
    python -m experiments.induction_heads --preset=paper          # train at 256, test 2^6 .. 2^20

Trains each model of ``--models`` at the preset's length, then measures accuracy at every power of
two from ``2^min_test_log2`` to ``2^max_test_log2`` (:func:`test_plan` says how). Long sequences are
read in chunks of ``--eval_chunk`` tokens, carrying Mamba's recurrent state (or the Transformer's KV
cache), so memory is bounded by the chunk, not the length; attention is quadratic, so the
Transformers are only tested up to ``--transformer_max_test_length`` (longer lengths print as a
dash).

The paper preset trains every model for the paper's step count (stopping early cost Mamba its
extrapolation past 2^16); ``--stop_after_perfect_evals=K`` stops a model once its validation
accuracy has been exactly 100% at K evaluations in a row. Either way the results record
``learned_at_step`` (the first of the last run of perfect evaluations) and ``stopped_at_step``. ``--max_train_seconds`` bounds each model's training in one call: the model is
checkpointed at the end of a log window and left untested, and no further model starts, so a run
can be split into calls of a fixed length, each with ``--resume``.

Each model's row is saved as ``<out_dir>/<model>/result.json`` (with the settings it ran with);
``results.md``, ``results.json``, ``accuracy_vs_length.png`` (log2 axis) and
``accuracy_vs_step.png`` are rebuilt after each call from every row saved in ``--out_dir`` with the
same task, model shape, seed, batch size, learning rate and test lengths, so models trained in
separate calls (``--models=mamba_s6``, then ``--models=mha_abs``, ...) end up in one table. With
``--resume``, a model whose ``result.json`` was made with this call's settings (steps and stopping
rule included) is not retrained or retested; its row is reused.
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
  test_tokens: int  # per length: long lengths get fewer examples (at least one batch)
  eval_chunk: int  # tokens per forward pass along the sequence, from this length on
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
    # Appendix E.1: vocabulary 16, train length 256, batch 8, 2 layers, D = 64; Adam without weight
    # decay at a constant rate, 1e-3 for Mamba and 2e-4 for the attention models ("the attention
    # ... models did not learn at LR 1e-3"); 25 "epochs" of 8192 steps for Mamba and MHA-Abs, 50
    # for MHA-RoPE, trained in full: on an H100, Mamba stopped after 3 perfect validation
    # evaluations (step 21,504) was exact only up to 2^16, trained the full 204,800 steps it was
    # exact up to 2^20 (results/induction_heads/2026-11-26_h100x2). --stop_after_perfect_evals=K
    # stops early. Evaluating every 1024 steps rather than every 8192-step epoch places the step
    # at which a model learned to within 1024; an evaluation (512 examples: 64 forward passes of
    # 8 x 256, in one compiled loop) costs less than 64 of the 1024 training steps between them.
    "paper": Preset(task=tasks.InductionHeads(length=256, vocab_size=16),
                    shape=models.ModelShape(vocab_size=16, d_model=64, n_layer=2, d_state=16, n_head=8,
                                            max_len=2**14),
                    models=("mamba_s6", "mha_abs", "mha_rope"), steps=8192 * 25, batch_size=8,
                    learning_rate=1e-3, log_every=256, eval_every=1024, eval_examples=512,
                    checkpoint_every=8192, stop_after_perfect_evals=0,
                    model_learning_rates=(("mha_abs", 2e-4), ("mha_rope", 2e-4)),
                    model_steps=(("mha_rope", 8192 * 50),), min_test_log2=6,
                    max_test_log2=20, test_examples=256, test_tokens=2**22, eval_chunk=2**13,
                    eval_batch_tokens=2**18, transformer_max_test_length=2**14),
}


# Attention scores per test forward pass, at most (256 MiB in float32).
ATTENTION_SCORES = 2**26


def test_lengths(preset: Preset) -> list[int]:
  return [2**k for k in range(preset.min_test_log2, preset.max_test_log2 + 1)]


def test_plan(name: str, length: int, preset: Preset) -> tuple[int, int, int | None]:
  """``(examples, batch, chunk)`` of the test at ``length`` for model ``name``.

  ``examples`` is ``min(test_examples, test_tokens // length)`` (at least 1), rounded up to
  whole batches. A Mamba-family model reads every length in chunks carrying its recurrent state,
  of one of two sizes: ``eval_chunk`` tokens from that length on (as many sequences a pass as the
  longest length has examples, at most ``eval_batch_tokens // eval_chunk``), and
  ``2^min_test_log2`` tokens below it (``test_examples`` sequences a pass, at most
  ``eval_batch_tokens // 2^min_test_log2``). The model is thus compiled for two shapes in a whole
  sweep, not once per length (reading in chunks gives the whole-sequence result; on the CPU it
  costs the same time). A Transformer is read
  whole up to ``eval_chunk`` and in chunks past it, with fewer sequences a pass as the attention
  scores grow; its KV cache is sized by the length, so it compiles once per length anyway.
  """
  examples = max(1, min(preset.test_examples, preset.test_tokens // length))
  if name in models.TRANSFORMER_MODELS:
    per_pass = min(length, preset.eval_chunk)
    batch = max(1, min(examples, preset.eval_batch_tokens // per_pass))
    # attention scores (batch, heads, chunk, length)
    batch = max(1, min(batch, ATTENTION_SCORES // (preset.shape.n_head * per_pass * length)))
    chunk = preset.eval_chunk if length > preset.eval_chunk else None
  else:
    if length >= preset.eval_chunk:
      # As many sequences a pass as the longest length has examples: every length keeps its
      # number of examples, in one shape.
      chunk = preset.eval_chunk
      fewest = max(1, preset.test_tokens // 2**preset.max_test_log2)
      batch = max(1, min(preset.eval_batch_tokens // chunk, fewest))
    else:
      chunk = min(length, 2**preset.min_test_log2)
      batch = max(1, min(preset.test_examples, preset.eval_batch_tokens // chunk))
  return -(-examples // batch) * batch, batch, chunk


def accuracy_by_length(model, name: str, preset: Preset, seed: int) -> dict[int, float | None]:
  """Accuracy at every test length (``None`` past the Transformer's limit)."""
  out = {}
  for length in test_lengths(preset):
    if name in models.TRANSFORMER_MODELS and length > preset.transformer_max_test_length:
      out[length] = None
      continue
    examples, batch, chunk = test_plan(name, length, preset)
    key = jax.random.fold_in(jax.random.key(seed + 1_000_003), length)
    accuracy, _ = train.evaluate(model, preset.task.with_length(length), key, examples, batch,
                                 chunk=chunk)
    out[length] = accuracy
  return out


def settings(preset: Preset, seed: int) -> dict:
  """What the models of one table share (:func:`experiments.cli.comparable_settings`), with the
  test lengths and how many examples each gets."""
  return cli.comparable_settings(
      preset, seed, test_lengths=test_lengths(preset), test_examples=preset.test_examples,
      test_tokens=preset.test_tokens, eval_batch_tokens=preset.eval_batch_tokens,
      transformer_max_test_length=preset.transformer_max_test_length)


def table(results: dict, preset: Preset) -> str:
  """The Markdown table of ``results`` (model name -> saved result)."""
  lengths = test_lengths(preset)
  pct = lambda a: None if a is None else f"{100 * a:.1f}"
  rows = [[r["label"], f"{r['params']:,}", r.get("learning_rate", preset.for_model(name).learning_rate),
           r["stopped_at_step"], r["learned_at_step"]]
          + [pct(r["accuracy_by_length"].get(str(l))) for l in lengths]
          for name, r in results.items()]
  return plotting.markdown_table(["Model", "Params", "lr", "Steps", "Learned at"]
                                 + [f"2^{l.bit_length() - 1}" for l in lengths], rows)


def run(preset: Preset, out_dir: str | Path, *, seed: int = 0, resume: bool = False,
        progress: bool = True, max_train_seconds: float | None = None,
        tabulate_only: bool = False) -> dict:
  """Trains and tests every model of ``preset``, saving each model's result; writes the table,
  JSON and plots of every result saved in ``out_dir`` with the same settings; returns those.
  ``tabulate_only``: train nothing, only rebuild the table and plots from the saved rows."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  comparable = settings(preset, seed)

  def test(name, res):
    t_eval = time.perf_counter()
    by_length = accuracy_by_length(res.model, name, preset, seed)
    return {"train_accuracy": res.final_accuracy,
            "test_seconds": round(time.perf_counter() - t_eval, 1),
            "accuracy_by_length": {str(k): v for k, v in by_length.items()}}

  if not tabulate_only:
    cli.train_each(preset, out_dir, comparable, test, seed=seed, resume=resume,
                   progress=progress, max_train_seconds=max_train_seconds)
  results = cli.merged_results(out_dir, models.MODEL_NAMES, comparable)
  if not results:
    print(f"no model of {out_dir} is trained and tested yet; nothing to tabulate")
    return results
  task = preset.task
  steps_note = "".join(f" ({models.LABELS[n]}: {k})" for n, k in preset.model_steps)
  stopping = (f"stopping after {preset.stop_after_perfect_evals} validation evaluations in a row "
              f"at 100% (every {preset.eval_every} steps, {preset.eval_examples} examples)"
              if preset.stop_after_perfect_evals else "")
  header = (f"Induction Heads: vocabulary {task.vocab_size}, trained at length {task.length} for "
            f"at most {preset.steps} steps{steps_note}{', ' + stopping if stopping else ''} (batch "
            f"{preset.batch_size}, {cli.describe_learning_rate(preset)}, {preset.shape.n_layer} layers, "
            f"d_model {preset.shape.d_model}, seed {seed}, {cli.devices(tabulate_only)}); accuracy (%) at each "
            f"test length. Steps: where training stopped; Learned at: the first step of the last "
            f"run of 100% validation evaluations. Chance: {100 * task.chance_accuracy:.1f}%. A "
            f"dash: not run (quadratic attention).")
  text = table(results, preset)
  cli.write_results(out_dir, preset, seed, results, t_start, f"{header}\n\n{text}")
  if not cli.writes_files():  # another process of a multi-process run: process 0 plots
    return results
  plotting.plot_accuracy_vs_length(
      {r["label"]: {int(k): v for k, v in r["accuracy_by_length"].items()} for r in results.values()},
      out_dir / "accuracy_vs_length.png", title="Induction Heads: length extrapolation",
      train_length=task.length, chance=task.chance_accuracy)
  plotting.plot_accuracy_vs_step(cli.histories(out_dir, results), out_dir / "accuracy_vs_step.png",
                                 title=f"Induction Heads (train length {task.length})",
                                 chance=task.chance_accuracy)
  print(f"\n{header}\n\n{text}\n\nwrote {out_dir}/results.md, results.json, accuracy_vs_length.png, "
        "accuracy_vs_step.png")
  return results


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined when run as a program (not on import, so that both task
  modules can be imported in one process)."""
  cli.define_flags("induction_heads", PRESETS, models.MODEL_NAMES)
  flags.DEFINE_integer("max_test_log2", None, "Test up to length 2^this; default: the preset's.")
  flags.DEFINE_integer("eval_chunk", None, "Tokens read per chunk at long test lengths; default: "
                       "the preset's.")
  flags.DEFINE_integer("transformer_max_test_length", None, "Longest length the Transformers are "
                       "tested at; default: the preset's.")
  flags.DEFINE_bool("pack", False, "Train on rows that pack --pack_documents examples of mixed "
                    "lengths (tasks.PackedInductionHeads, segment_ids); Mamba-family models only. "
                    "Testing is unchanged (one example per row).")
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
  define_flags()
  app.run(main)
