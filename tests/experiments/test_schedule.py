"""Learning-rate schedules and per-model learning rates and steps of a preset."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import cli, induction_heads, models, selective_copying, tasks, train

TASK = tasks.SelectiveCopying(length=19, num_tokens=3, vocab_size=6)
SHAPE = models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3, n_head=2, max_len=32,
                          scan_backend="sequential")


def test_constant_without_warmup_is_a_float():
  config = train.TrainConfig(steps=10, batch_size=2, learning_rate=3e-3)
  assert train.learning_rate_schedule(config) == 3e-3


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_schedule_matches_its_closed_form(kind):
  steps, warmup, peak = 37, 5, 2e-3
  config = train.TrainConfig(steps=steps, batch_size=2, learning_rate=peak, lr_schedule=kind,
                             warmup_steps=warmup)
  lr = train.learning_rate_schedule(config)
  for t in range(steps):
    if t < warmup:
      want = peak * t / warmup
    elif kind == "constant":
      want = peak
    else:
      want = peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (steps - warmup)))
    np.testing.assert_allclose(float(lr(t)), want, rtol=1e-5, atol=1e-12, err_msg=f"step {t}")
  assert float(lr(steps)) == pytest.approx(0.0 if kind == "cosine" else peak, rel=1e-6, abs=1e-12)


def test_cosine_over_the_last_steps_only():
  config = train.TrainConfig(steps=30, batch_size=2, learning_rate=1e-3, lr_schedule="cosine",
                             warmup_steps=4, decay_steps=11)
  lr = train.learning_rate_schedule(config)
  for t in range(31):
    if t < 4:
      want = 1e-3 * t / 4
    elif t < 19:
      want = 1e-3
    else:
      want = 1e-3 * 0.5 * (1 + np.cos(np.pi * (t - 19) / 11))
    np.testing.assert_allclose(float(lr(t)), want, rtol=1e-5, atol=1e-12, err_msg=f"step {t}")


def test_config_rejects_bad_schedules():
  with pytest.raises(ValueError, match="lr_schedule"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, lr_schedule="linear")
  with pytest.raises(ValueError, match="warmup_steps must be < steps=5"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, warmup_steps=5)
  with pytest.raises(ValueError, match="decay_steps needs lr_schedule='cosine'"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, decay_steps=2)
  with pytest.raises(ValueError, match="decay_steps must be <= steps - warmup_steps = 3"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, lr_schedule="cosine",
                      warmup_steps=2, decay_steps=4)
  with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, warmup_steps=-1)
  with pytest.raises(ValueError, match="grad_clip must be a non-negative number"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, grad_clip=-1.0)


def test_grad_clip_scales_a_large_gradient_to_the_norm():
  # Adam's first step is lr * g / (|g| + eps) per element, so clipping shows in its first moment:
  # mu = (1 - b1) * clipped gradient after one update.
  config = train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, grad_clip=0.5)
  opt = train.make_optimizer(config)
  mu = lambda g: opt.update(g, opt.init(g), g)[1][1][0].mu
  grads = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([[12.0]], np.float32)}  # global norm 13
  np.testing.assert_allclose(mu(grads)["a"], 0.1 * np.array([3.0, 4.0]) * 0.5 / 13, rtol=1e-6)
  np.testing.assert_allclose(mu(grads)["b"], [[0.1 * 12.0 * 0.5 / 13]], rtol=1e-6)
  small = {"a": np.array([0.03, 0.04], np.float32), "b": np.array([[0.12]], np.float32)}  # norm 0.13: unchanged
  np.testing.assert_allclose(mu(small)["a"], 0.1 * small["a"], rtol=1e-6)
  # Without clipping the optimizer is plain Adam (the state layout of older runs).
  plain = train.make_optimizer(dataclasses.replace(config, grad_clip=0.0))
  assert type(plain.init(grads)[0]).__name__ == "ScaleByAdamState"


def test_train_records_the_largest_gradient_norm_of_each_window(tmp_path):
  import jax
  from flax import nnx

  make = lambda rngs: models.make_model("mamba_s6", SHAPE, rngs)
  config = train.TrainConfig(steps=4, batch_size=4, learning_rate=5e-3, log_every=2,
                             progress=False, eval_examples=4, grad_clip=1e-3)
  got = [r["grad_norm_max"] for r in train.train(make, TASK, config, tmp_path).records
         if r["kind"] == "train"]
  # By hand, step by step: the norm before clipping (clipping at 1e-3 would cap it there).
  model = make(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, train.make_optimizer(config), wrt=nnx.Param)
  data_key = jax.random.fold_in(jax.random.key(0), 1)
  step = nnx.jit(train._train_step)
  norms = [float(step(model, optimizer, TASK.sample(jax.random.fold_in(data_key, i), 4))[2])
           for i in range(4)]
  assert min(norms) > 1e-3
  assert got == [pytest.approx(max(norms[:2]), rel=1e-4), pytest.approx(max(norms[2:]), rel=1e-4)]


def test_clipped_run_records_its_setting(tmp_path):
  preset = dataclasses.replace(TINY, models=("mamba_s6",), grad_clip=1.0)
  results = induction_heads.run(preset, tmp_path, progress=False)
  assert "gradients clipped to global norm 1.0" in (tmp_path / "results.md").read_text()
  saved = json.loads((tmp_path / "mamba_s6" / "result.json").read_text())["settings"]
  assert saved["grad_clip"] == 1.0 and "mamba_s6" in results
  # A row trained with clipping is not merged into a table without it.
  comparable = induction_heads.settings(dataclasses.replace(preset, grad_clip=0.0), 0)
  assert cli.merged_results(tmp_path, models.MODEL_NAMES, comparable) == {}


def test_scheduled_run_logs_its_rate_and_resumes_bit_identically(tmp_path):
  make = lambda rngs: models.make_model("mamba_s6", SHAPE, rngs)
  config = train.TrainConfig(steps=8, batch_size=4, learning_rate=5e-3, lr_schedule="cosine",
                             warmup_steps=2, log_every=2, checkpoint_every=4, progress=False,
                             eval_examples=4)
  full = train.train(make, TASK, config, tmp_path / "full")
  rates = [r["lr"] for r in full.records if r["kind"] == "train"]
  lr = train.learning_rate_schedule(config)
  assert rates == [pytest.approx(float(lr(s - 1))) for s in (2, 4, 6, 8)]
  assert rates[0] > rates[-1] > 0
  # The schedule is a function of the step in Adam's state: a resumed run continues it.
  part = train.train(make, TASK, dataclasses.replace(config, max_seconds=1e-9), tmp_path / "cut")
  assert not part.complete
  rest = train.train(make, TASK, dataclasses.replace(config, resume=True), tmp_path / "cut")
  strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
  assert strip(rest.records) == strip(full.records)


TINY = induction_heads.Preset(
    task=tasks.InductionHeads(length=16, vocab_size=6),
    shape=models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3, n_head=2, max_len=64,
                            scan_backend="sequential"),
    models=("mamba_s6", "mha_abs"), steps=4, batch_size=4, learning_rate=1e-3, log_every=2,
    eval_every=2, eval_examples=4, checkpoint_every=0, min_test_log2=4, max_test_log2=5,
    test_examples=4, test_tokens=64, eval_chunk=32, eval_batch_tokens=64,
    transformer_max_test_length=32, model_learning_rates=(("mha_abs", 2e-4),),
    model_steps=(("mha_abs", 6),))


def test_per_model_rates_and_steps_reach_training_and_the_table(tmp_path, monkeypatch):
  seen = {}
  real = train.train

  def spy(make_model, task, config, run_dir, **kw):
    seen[kw["name"]] = (config.learning_rate, config.steps)
    return real(make_model, task, config, run_dir, **kw)

  monkeypatch.setattr(train, "train", spy)
  results = induction_heads.run(TINY, tmp_path, progress=False)
  assert seen == {"mamba_s6": (1e-3, 4), "mha_abs": (2e-4, 6)}
  assert (results["mamba_s6"]["learning_rate"], results["mha_abs"]["learning_rate"]) == (1e-3, 2e-4)
  assert (results["mamba_s6"]["stopped_at_step"], results["mha_abs"]["stopped_at_step"]) == (4, 6)
  md = (tmp_path / "results.md").read_text()
  assert "Adam lr 0.001 (MHA-Abs: 0.0002)" in md and "at most 4 steps (MHA-Abs: 6)" in md
  assert "| MHA-Abs | " in md and " | 0.0002 | 6 | " in md
  saved = json.loads((tmp_path / "mha_abs" / "result.json").read_text())["settings"]
  assert saved["model_learning_rates"] == {"mha_abs": 2e-4} and saved["steps"] == 6
  # Rows trained without the per-model rates are another table.
  plain = dataclasses.replace(TINY, model_learning_rates=(), model_steps=())
  comparable = induction_heads.settings(plain, 0)
  assert cli.merged_results(tmp_path, models.MODEL_NAMES, comparable) == {}


def test_paper_preset_follows_appendix_e1():
  paper = induction_heads.PRESETS["paper"]
  assert paper.for_model("mamba_s6").learning_rate == 1e-3
  assert paper.for_model("mha_abs").learning_rate == paper.for_model("mha_rope").learning_rate == 2e-4
  assert paper.for_model("mamba_s6").steps == paper.for_model("mha_abs").steps == 8192 * 25
  assert paper.for_model("mha_rope").steps == 8192 * 50
  assert paper.stop_after_perfect_evals == 0  # the full count: stopping early cost extrapolation


def test_selective_copying_paper_80k_keeps_the_papers_task_model_and_batch():
  paper, budget = selective_copying.PRESETS["paper"], selective_copying.PRESETS["paper_80k"]
  assert (budget.task, budget.shape, budget.models, budget.batch_size) == (
      paper.task, paper.shape, paper.models, paper.batch_size)
  assert (budget.steps, budget.decay_steps, budget.lr_schedule) == (80_000, 10_000, "cosine")
  assert (budget.learning_rate, budget.grad_clip, budget.warmup_steps) == (1e-3, 1.0, 0)


def test_tabulate_only_trains_nothing_and_rebuilds_the_table(tmp_path, monkeypatch):
  first = induction_heads.run(dataclasses.replace(TINY, models=("mamba_s6",)), tmp_path,
                              progress=False)
  (tmp_path / "results.md").unlink()

  def no_training(*args, **kwargs):
    raise AssertionError("tabulate_only trained a model")

  monkeypatch.setattr(cli, "train_model", no_training)
  again = induction_heads.run(TINY, tmp_path, progress=False, tabulate_only=True)
  assert again == first  # mha_abs has no row: it is not trained either
  assert "rows tabulated from earlier runs" in (tmp_path / "results.md").read_text()
