"""Early stopping on perfect evaluations, the time budget, chunked steps, and the per-model results
merged across calls of an entry point (issue 15, Table 2 protocol)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import cli, induction_heads, models, selective_copying, tasks, train

TASK = tasks.SelectiveCopying(length=19, num_tokens=3, vocab_size=6)
SHAPE = models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3, scan_backend="sequential")
CONFIG = train.TrainConfig(steps=40, batch_size=4, learning_rate=5e-3, log_every=2, eval_every=2,
                           checkpoint_every=4, progress=False, eval_examples=4,
                           stop_after_perfect_evals=3)


def _make(rngs):
  return models.make_model("mamba_s6", SHAPE, rngs)


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  a, b = _params(a), _params(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _records(run):
  return [{k: v for k, v in r.items() if k != "time_s"}
          for r in train.read_records(run / "metrics.jsonl")]


def _scripted_evaluate(monkeypatch, accuracies):
  """``train.evaluate`` returning ``accuracies`` in turn (then 1.0); returns the call log."""
  calls = []

  def fake(model, task, key, examples, batch_size, chunk=None):
    calls.append(examples)
    i = len(calls) - 1
    return (accuracies[i] if i < len(accuracies) else 1.0), 0.5

  monkeypatch.setattr(train, "evaluate", fake)
  return calls


def test_stops_after_k_perfect_evaluations_and_resume_does_not_retrain(tmp_path, monkeypatch):
  # Evaluations at steps 2, 4, ..., 12: the last three perfect ones start at step 8.
  _scripted_evaluate(monkeypatch, [0.5, 1.0, 0.9, 1.0, 1.0, 1.0, 0.0])
  res = train.train(_make, TASK, CONFIG, tmp_path)
  assert (res.stop_reason, res.stopped_at_step, res.learned_at_step) == ("perfect_evals", 12, 8)
  assert res.complete and res.final_accuracy == 1.0
  evals = [r["step"] for r in res.records if r["kind"] == "eval"]
  assert evals == [2, 4, 6, 8, 10, 12]
  assert max(r["step"] for r in res.records) == 12
  # The stopping step is checkpointed (here on the checkpoint_every grid; off it below).
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8, 12]

  # Resumed: no training step and no evaluation; the same model and records.
  def no_steps(*args, **kwargs):
    raise AssertionError("a run that stopped early was trained again")

  monkeypatch.setattr(train, "_train_steps", no_steps)
  calls = _scripted_evaluate(monkeypatch, [])
  again = train.train(_make, TASK, dataclasses.replace(CONFIG, resume=True), tmp_path)
  assert calls == []
  assert (again.stop_reason, again.stopped_at_step, again.learned_at_step) == ("perfect_evals", 12, 8)
  _assert_same_params(again.model, res.model)
  assert _records(tmp_path) == [{k: v for k, v in r.items() if k != "time_s"} for r in res.records]


def test_stop_off_the_checkpoint_grid_is_checkpointed_and_a_longer_patience_continues(tmp_path,
                                                                                      monkeypatch):
  _scripted_evaluate(monkeypatch, [1.0, 1.0, 1.0])
  config = dataclasses.replace(CONFIG, checkpoint_every=4)
  res = train.train(_make, TASK, config, tmp_path)
  assert (res.stopped_at_step, res.learned_at_step) == (6, 2)
  assert 6 in {int(p.name) for p in (tmp_path / "checkpoints").iterdir()}
  # Asking for 5 perfect evaluations in a row continues from step 6 until there are 5.
  res5 = train.train(_make, TASK, dataclasses.replace(config, resume=True,
                                                      stop_after_perfect_evals=5), tmp_path)
  assert (res5.stop_reason, res5.stopped_at_step, res5.learned_at_step) == ("perfect_evals", 10, 2)
  # The same as a run that never stopped, up to step 10.
  _scripted_evaluate(monkeypatch, [1.0] * 5)
  straight = train.train(_make, TASK, dataclasses.replace(config, stop_after_perfect_evals=5),
                         tmp_path / "straight")
  _assert_same_params(res5.model, straight.model)
  assert _records(tmp_path) == _records(tmp_path / "straight")


def test_no_early_stop_by_default_and_learned_step_of_the_last_run(tmp_path, monkeypatch):
  _scripted_evaluate(monkeypatch, [1.0, 1.0, 1.0, 0.5, 1.0])
  config = dataclasses.replace(CONFIG, steps=10, stop_after_perfect_evals=0, checkpoint_every=0)
  res = train.train(_make, TASK, config, tmp_path)
  # Evaluations at 2, 4, 6, 8 and the final one at 10: the last perfect run starts at 10.
  assert (res.stop_reason, res.stopped_at_step, res.learned_at_step) == ("steps", 10, 10)
  assert train.learned_at_step([{"kind": "eval", "step": 4, "accuracy": 0.99}]) is None
  assert train.learned_at_step([]) is None


def test_config_checks_of_the_stopping_rules():
  with pytest.raises(ValueError, match="stop_after_perfect_evals needs eval_every to be a positive "
                     "multiple of log_every=2"):
    dataclasses.replace(CONFIG, eval_every=3)
  with pytest.raises(ValueError, match="stop_after_perfect_evals needs eval_every"):
    dataclasses.replace(CONFIG, eval_every=0)
  with pytest.raises(ValueError, match="stop_after_perfect_evals must be a non-negative integer"):
    dataclasses.replace(CONFIG, stop_after_perfect_evals=-1)
  with pytest.raises(ValueError, match="max_seconds must be a positive number or None"):
    dataclasses.replace(CONFIG, max_seconds=0)


def test_time_limit_checkpoints_and_resume_continues_bit_identically(tmp_path):
  config = train.TrainConfig(steps=8, batch_size=4, learning_rate=5e-3, log_every=2, eval_every=4,
                             checkpoint_every=0, progress=False, eval_examples=4)
  full = train.train(_make, TASK, config, tmp_path / "full")
  run = tmp_path / "cut"
  # A budget spent at once: each call trains one log window, checkpoints it and returns.
  for expected in (2, 4):
    part = train.train(_make, TASK, dataclasses.replace(config, max_seconds=1e-9,
                                                        resume=expected > 2), run)
    assert (part.stop_reason, part.stopped_at_step, part.complete) == ("time_limit", expected, False)
    assert expected in {int(p.name) for p in (run / "checkpoints").iterdir()}
    assert max(r["step"] for r in train.read_records(run / "metrics.jsonl")) == expected
  done = train.train(_make, TASK, dataclasses.replace(config, resume=True), run)
  assert done.complete and done.stopped_at_step == 8
  _assert_same_params(done.model, full.model)
  assert _records(run) == _records(tmp_path / "full")
  assert done.final_accuracy == full.final_accuracy


def test_steps_on_the_device_one_compilation_and_the_same_data_stream(tmp_path):
  """One compilation serves a run; a loop of 4 steps per call trains as single steps do; both
  equal steps taken one by one on task.sample(fold_in(data_key, step))."""
  base = train.TrainConfig(steps=8, batch_size=4, learning_rate=5e-3, log_every=4, progress=False,
                           eval_examples=4)
  before = train._train_steps._cache_size()
  ones = train.train(_make, TASK, base, tmp_path / "ones")
  assert train._train_steps._cache_size() - before == 1  # eight calls, one compilation
  fours = train.train(_make, TASK, dataclasses.replace(base, steps_per_call=4), tmp_path / "fours")
  a, b = _params(ones.model), _params(fours.model)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose([r["loss"] for r in fours.records], [r["loss"] for r in ones.records],
                             rtol=1e-5)
  # By hand: one step at a time, the batch drawn outside the step.
  model = _make(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, train.optax.adam(5e-3), wrt=nnx.Param)
  data_key = jax.random.fold_in(jax.random.key(0), 1)
  step = nnx.jit(train._train_step)
  for i in range(8):
    step(model, optimizer, TASK.sample(jax.random.fold_in(data_key, i), 4))
  mine = _params(model)
  for k in mine:
    np.testing.assert_allclose(a[k], mine[k], rtol=2e-5, atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="steps_per_call must divide log_every=4 and eval_every=0; "
                     "got 3"):
    dataclasses.replace(base, steps_per_call=3)


# ------------------------------------------------------------------------------------------------
# the entry points: per-model results merged across calls

TINY = induction_heads.Preset(
    task=tasks.InductionHeads(length=16, vocab_size=6),
    shape=models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3, n_head=2, max_len=64,
                            scan_backend="sequential"),
    models=("mamba_s6",), steps=4, batch_size=4, learning_rate=1e-3, log_every=2, eval_every=2,
    eval_examples=4, checkpoint_every=2, min_test_log2=4, max_test_log2=7, test_examples=8,
    test_tokens=256, eval_chunk=32, eval_batch_tokens=128, transformer_max_test_length=32)


def test_models_trained_in_separate_calls_share_one_table(tmp_path, monkeypatch, capsys):
  induction_heads.run(TINY, tmp_path, progress=False)
  induction_heads.run(dataclasses.replace(TINY, models=("mha_abs",)), tmp_path, progress=False)
  for name in ("mamba_s6", "mha_abs"):
    saved = json.loads((tmp_path / name / "result.json").read_text())
    assert saved["result"]["stopped_at_step"] == 4 and saved["result"]["stop_reason"] == "steps"
  results = json.loads((tmp_path / "results.json").read_text())["models"]
  assert list(results) == ["mamba_s6", "mha_abs"]
  assert results["mha_abs"]["accuracy_by_length"]["64"] is None  # past transformer_max_test_length
  assert results["mamba_s6"]["accuracy_by_length"]["128"] is not None
  md = (tmp_path / "results.md").read_text()
  assert "| Mamba block, S6 (Mamba) |" in md and "| MHA-Abs |" in md
  assert "| Model | Params | lr | Steps | Learned at | 2^4 |" in md
  assert (tmp_path / "accuracy_vs_length.png").exists() and (tmp_path / "accuracy_vs_step.png").exists()

  # A row made with other settings (here another learning rate) is left out of the table.
  other = json.loads((tmp_path / "mha_abs" / "result.json").read_text())
  other["settings"]["learning_rate"] = 2e-3
  other["result"]["label"] = "MHA-RoPE"
  (tmp_path / "mha_rope").mkdir()
  (tmp_path / "mha_rope" / "result.json").write_text(json.dumps(other))

  # With --resume and the same settings, both rows are reused: nothing is trained or tested.
  def no_training(*args, **kwargs):
    raise AssertionError("a model with a current result was trained again")

  monkeypatch.setattr(cli, "train_model", no_training)
  both = induction_heads.run(dataclasses.replace(TINY, models=("mamba_s6", "mha_abs")), tmp_path,
                             resume=True, progress=False)
  assert both == results
  assert "MHA-RoPE" not in (tmp_path / "results.md").read_text()
  assert "mha_rope/result.json left out of the table: it was made with other settings " \
         "(learning_rate)" in capsys.readouterr().out


def test_time_limited_model_has_no_row_until_resumed(tmp_path, capsys):
  preset = dataclasses.replace(TINY, models=("mamba_s6", "mha_abs"), steps=6)
  assert induction_heads.run(preset, tmp_path, progress=False, max_train_seconds=1e-9) == {}
  out = capsys.readouterr().out
  assert "mamba_s6: at step 2 of 6, stopped by --max_train_seconds" in out
  assert "not started: ['mha_abs']" in out
  assert not (tmp_path / "mamba_s6" / "result.json").exists()
  assert not (tmp_path / "mha_abs").exists()
  results = induction_heads.run(preset, tmp_path, resume=True, progress=False)
  assert [r["stopped_at_step"] for r in results.values()] == [6, 6]


def test_selective_copying_rows_merge_and_record_the_stop(tmp_path, monkeypatch):
  preset = selective_copying.Preset(task=TASK, shape=SHAPE, models=("s6",), steps=8, batch_size=4,
                                    learning_rate=5e-3, log_every=2, eval_every=2, eval_examples=4,
                                    checkpoint_every=0, stop_after_perfect_evals=2)
  _scripted_evaluate(monkeypatch, [0.5, 1.0, 1.0])
  results = selective_copying.run(preset, tmp_path, progress=False)
  assert (results["s6"]["stopped_at_step"], results["s6"]["learned_at_step"]) == (6, 4)
  results = selective_copying.run(dataclasses.replace(preset, models=("s4",)), tmp_path,
                                  progress=False)
  assert list(results) == ["s4", "s6"]
  assert "| Model | Params | Steps | Learned at |" in (tmp_path / "results.md").read_text()


# ------------------------------------------------------------------------------------------------
# the length sweep


def test_mamba_sweep_compiles_two_shapes_and_keeps_the_examples():
  preset = dataclasses.replace(TINY, min_test_log2=4, max_test_log2=10, eval_chunk=64,
                               test_examples=8, test_tokens=2**12, eval_batch_tokens=256)
  plans = {l: induction_heads.test_plan("mamba_s6", l, preset) for l in induction_heads.test_lengths(preset)}
  assert len({(batch, chunk) for _, batch, chunk in plans.values()}) == 2
  for length, (examples, batch, chunk) in plans.items():
    assert examples == max(1, min(8, 2**12 // length))  # as many examples as before
    assert length % chunk == 0 and examples % batch == 0
  model = models.make_model("mamba_s6", preset.shape, nnx.Rngs(0))
  before = train._chunk_counts._cache_size()
  by_length = induction_heads.accuracy_by_length(model, "mamba_s6", preset, seed=0)
  assert train._chunk_counts._cache_size() - before <= 2
  assert all(0.0 <= a <= 1.0 for a in by_length.values())
  # The paper preset: two shapes for the 15 lengths; the Transformers stop at 2^14.
  paper = induction_heads.PRESETS["paper"]
  shapes = {induction_heads.test_plan("mamba_s6", l, paper)[1:] for l in induction_heads.test_lengths(paper)}
  assert shapes == {(256, 64), (4, 2**13)}


def test_reading_in_one_chunk_equals_the_whole_sequence():
  shape = models.ModelShape(vocab_size=5, d_model=8, n_layer=2, d_state=3, scan_backend="sequential")
  model = models.make_model("mamba_s6", shape, nnx.Rngs(3))
  task = tasks.InductionHeads(length=32, vocab_size=5)
  whole = train.evaluate(model, task, jax.random.key(7), examples=6, batch_size=3)
  one_chunk = train.evaluate(model, task, jax.random.key(7), examples=6, batch_size=3, chunk=32)
  np.testing.assert_allclose(one_chunk, whole, rtol=1e-5)
