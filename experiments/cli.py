"""What the synthetic-task entry points share: their presets, absl flags, training one model of a
preset, and writing the results.

Launched as several processes (hosts; :func:`ssmax.parallel.initialize_distributed`), every process
runs the same program and only process 0 writes the results and plots (:func:`writes_files`)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from absl import app, flags

from experiments import models, train
from ssmax import parallel

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Preset:
  """What a task entry point trains: the task, the model shape and names, and the schedule."""

  task: Any
  shape: models.ModelShape
  models: tuple[str, ...]
  steps: int
  batch_size: int
  learning_rate: float
  log_every: int
  eval_every: int
  eval_examples: int
  checkpoint_every: int
  # Stop a model's training after this many consecutive validation evaluations at exactly 100%
  # (0: train for ``steps``); see train.TrainConfig.stop_after_perfect_evals.
  stop_after_perfect_evals: int = dataclasses.field(default=0, kw_only=True)
  # Training steps per compiled call (a loop on the device when > 1); divides log_every and
  # eval_every. See train.TrainConfig.steps_per_call.
  steps_per_call: int = dataclasses.field(default=1, kw_only=True)
  # The learning rate's shape over the run (train.TrainConfig.lr_schedule, warmup_steps).
  lr_schedule: str = dataclasses.field(default="constant", kw_only=True)
  warmup_steps: int = dataclasses.field(default=0, kw_only=True)
  decay_steps: int = dataclasses.field(default=0, kw_only=True)
  # Global-norm gradient clipping before Adam (train.TrainConfig.grad_clip; 0: none).
  grad_clip: float = dataclasses.field(default=0.0, kw_only=True)
  # Per-model exceptions to learning_rate and steps, as (model, value) pairs: the paper trains its
  # attention baselines at another rate, and for longer, than Mamba.
  model_learning_rates: tuple[tuple[str, float], ...] = dataclasses.field(default=(), kw_only=True)
  model_steps: tuple[tuple[str, int], ...] = dataclasses.field(default=(), kw_only=True)

  def for_model(self, name: str) -> "Preset":
    """This preset with model ``name``'s learning rate and steps in ``learning_rate`` and
    ``steps``."""
    return dataclasses.replace(self, learning_rate=dict(self.model_learning_rates).get(
        name, self.learning_rate), steps=dict(self.model_steps).get(name, self.steps))


# Flags whose value, when given, replaces the preset's field of the same name.
PRESET_FIELDS = ("steps", "batch_size", "learning_rate", "checkpoint_every", "eval_every",
                 "eval_examples", "stop_after_perfect_evals", "steps_per_call", "lr_schedule",
                 "warmup_steps", "decay_steps", "grad_clip")


def define_flags(task: str, presets: Sequence[str], model_names: Sequence[str]) -> None:
  """Defines the flags every task entry point has; ``task`` names the default output folder."""
  flags.DEFINE_enum("preset", "quick", list(presets), "quick: CPU minutes; paper: appendix E.1 "
                    "sizes; paper_80k (Selective Copying): the paper's task, model and batch "
                    "in 80K steps at lr 1e-3 with clipping.")
  flags.DEFINE_list("models", None, f"Models to train, from {list(model_names)}; default: the preset's.")
  flags.DEFINE_integer("steps", None, "Training steps of every model; default: the preset's "
                       "(which may give some models more).")
  flags.DEFINE_integer("batch_size", None, "Global batch size; default: the preset's.")
  flags.DEFINE_float("learning_rate", None, "Adam learning rate of every model (the peak, with a "
                     "schedule); default: the preset's (which may differ between models).")
  flags.DEFINE_enum("lr_schedule", None, ["constant", "cosine"], "constant, or cosine decay to 0 "
                    "at the last step; default: the preset's (constant).")
  flags.DEFINE_integer("warmup_steps", None, "Steps of linear warm-up from 0 to the learning rate; "
                       "default: the preset's (0).")
  flags.DEFINE_integer("decay_steps", None, "With --lr_schedule=cosine: decay over the last this "
                       "many steps only, constant before (0: every step after the warm-up); "
                       "default: the preset's (0).")
  flags.DEFINE_float("grad_clip", None, "Clip each gradient to this global norm before Adam (0: "
                     "no clipping); default: the preset's (0).")
  flags.DEFINE_integer("seed", 0, "Seed of the parameters, the data stream and the test sets.")
  flags.DEFINE_string("out_dir", None, f"Output directory; default runs/{task}_<preset>.")
  flags.DEFINE_bool("resume", False, "Continue each model from its latest checkpoint in --out_dir.")
  flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints (0: none); default: the preset's.")
  flags.DEFINE_integer("eval_every", None, "Steps between validation evaluations; default: the preset's.")
  flags.DEFINE_integer("eval_examples", None, "Size of the validation set at the training length; default: "
                       "the preset's.")
  flags.DEFINE_integer("stop_after_perfect_evals", None, "Stop a model's training once this many "
                       "consecutive validation evaluations are at exactly 100% (0: never); default: "
                       "the preset's.")
  flags.DEFINE_integer("steps_per_call", None, "Training steps per compiled call, a loop on the "
                       "device when > 1 (fewer host dispatches; on the CPU it was slower); must "
                       "divide the log and eval intervals. Default: the preset's (1).")
  flags.DEFINE_float("max_train_seconds", None, "Wall-clock budget of each model's training in this "
                     "call: past it, training stops at the end of the current log window, "
                     "checkpoints and moves on without testing that model (and starts no further "
                     "model); rerun with --resume to continue. Default: no limit.")
  flags.DEFINE_string("scan_backend", None, "Selective scan backend (auto, sequential, associative, "
                      "pallas); default: the preset's.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  flags.DEFINE_bool("tabulate_only", False, "Train nothing: rebuild the table, JSON and plots from "
                    "the rows saved in --out_dir with these settings (e.g. after gathering rows "
                    "trained in separate folders).")


def preset_changes(preset, model_names: Sequence[str], extra_fields: Sequence[str] = ()) -> dict:
  """The preset fields the command line overrides, checked; for ``dataclasses.replace``."""
  names = PRESET_FIELDS + tuple(extra_fields)
  changes = {k: getattr(FLAGS, k) for k in names if getattr(FLAGS, k) is not None}
  # A value given on the command line holds for every model.
  if "learning_rate" in changes:
    changes["model_learning_rates"] = ()
  if "steps" in changes:
    changes["model_steps"] = ()
  if FLAGS.models:
    for name in FLAGS.models:
      if name not in model_names:
        raise app.UsageError(f"--models must be among {list(model_names)}; got {name!r}")
    changes["models"] = tuple(FLAGS.models)
  if FLAGS.scan_backend:
    changes["shape"] = dataclasses.replace(preset.shape, scan_backend=FLAGS.scan_backend)
  if changes.get("checkpoint_every", 0) % preset.log_every:
    raise app.UsageError(f"--checkpoint_every must be a multiple of {preset.log_every}")
  if "steps_per_call" in changes:
    every = (preset.log_every, changes.get("eval_every", preset.eval_every))
    if changes["steps_per_call"] < 1 or any(e % changes["steps_per_call"] for e in every):
      raise app.UsageError(f"--steps_per_call must be >= 1 and divide log_every={every[0]} and "
                           f"eval_every={every[1]}")
  if changes.get("stop_after_perfect_evals", 0) < 0:
    raise app.UsageError("--stop_after_perfect_evals must be >= 0")
  for name in ("warmup_steps", "decay_steps"):
    if changes.get(name, 0) < 0:
      raise app.UsageError(f"--{name} must be >= 0")
  if changes.get("grad_clip", 0) < 0:
    raise app.UsageError(f"--grad_clip must be >= 0; got {changes['grad_clip']}")
  if FLAGS.max_train_seconds is not None and not FLAGS.max_train_seconds > 0:
    raise app.UsageError(f"--max_train_seconds must be > 0; got {FLAGS.max_train_seconds}")
  return changes


def train_config(preset: Preset, *, seed: int, resume: bool, progress: bool,
                 max_seconds: float | None = None) -> train.TrainConfig:
  """The :class:`~experiments.train.TrainConfig` of ``preset`` (one model's:
  :meth:`Preset.for_model`)."""
  return train.TrainConfig(steps=preset.steps, batch_size=preset.batch_size,
                           learning_rate=preset.learning_rate, lr_schedule=preset.lr_schedule,
                           warmup_steps=preset.warmup_steps, decay_steps=preset.decay_steps,
                           grad_clip=preset.grad_clip, seed=seed,
                           log_every=preset.log_every, eval_every=preset.eval_every,
                           eval_examples=preset.eval_examples,
                           checkpoint_every=preset.checkpoint_every, resume=resume,
                           progress=progress,
                           stop_after_perfect_evals=preset.stop_after_perfect_evals,
                           steps_per_call=preset.steps_per_call, max_seconds=max_seconds)


def train_model(preset: Preset, name: str, out_dir: Path, *, seed: int, resume: bool,
                progress: bool, max_seconds: float | None = None) -> train.TrainResult:
  """Trains model ``name`` of ``preset`` on its task, into ``out_dir/name``."""
  config = train_config(preset.for_model(name), seed=seed, resume=resume, progress=progress,
                        max_seconds=max_seconds)
  return train.train(lambda rngs: models.make_model(name, preset.shape, rngs), preset.task, config,
                     out_dir / name, name=name)


def describe_stop(name: str, res: train.TrainResult, preset: Preset) -> str:
  """One line: where model ``name`` stopped and why, and when it learned."""
  learned = ("never reached 100% validation accuracy at the last evaluation"
             if res.learned_at_step is None else
             f"100% validation accuracy from step {res.learned_at_step} on")
  steps = preset.for_model(name).steps
  why = {"steps": f"ran all {steps} steps",
         "perfect_evals": f"stopped early after {preset.stop_after_perfect_evals} perfect "
                          "evaluations in a row",
         "time_limit": "stopped by --max_train_seconds (checkpointed; rerun with --resume to "
                       "continue)"}[res.stop_reason]
  return f"{name}: at step {res.stopped_at_step} of {steps}, {why}; {learned}."


def describe_learning_rate(preset: Preset) -> str:
  """``"Adam lr 0.001"``, with the per-model exceptions and the schedule, for a results header."""
  text = f"Adam lr {preset.learning_rate}"
  if preset.model_learning_rates:
    text += " (" + ", ".join(f"{models.LABELS[n]}: {lr}" for n, lr in preset.model_learning_rates) + ")"
  if preset.lr_schedule != "constant":
    over = f" over the last {preset.decay_steps} steps" if preset.decay_steps else ""
    text += f", {preset.lr_schedule} decay to 0 at the last step{over}"
  if preset.warmup_steps:
    text += f" after {preset.warmup_steps} steps of linear warm-up"
  if preset.grad_clip:
    text += f", gradients clipped to global norm {preset.grad_clip}"
  return text


# ------------------------------------------------------------------------------------------------
# per-model results, merged across calls

RESULT_FILE = "result.json"


# Keys of comparable_settings present only when they differ from the defaults.
OPTIONAL_SETTINGS = frozenset({"model_learning_rates", "lr_schedule", "warmup_steps",
                               "decay_steps", "grad_clip"})


def comparable_settings(preset: Preset, seed: int, **extra) -> dict:
  """What the models of one results table must share: the task, the model shape (the scan backend
  aside), the seed, the batch size, the learning rates and their schedule, and ``extra`` (how they
  are tested). Steps may differ between models (the table gives each model's). The schedule and
  the per-model rates are keys only when they differ from the defaults, so that rows saved before
  they existed still merge."""
  shape = dataclasses.asdict(preset.shape)
  shape.pop("scan_backend")
  optional = {}
  if preset.model_learning_rates:
    optional["model_learning_rates"] = dict(preset.model_learning_rates)
  if preset.lr_schedule != "constant" or preset.warmup_steps:
    optional.update(lr_schedule=preset.lr_schedule, warmup_steps=preset.warmup_steps)
  if preset.decay_steps:
    optional["decay_steps"] = preset.decay_steps
  if preset.grad_clip:
    optional["grad_clip"] = preset.grad_clip
  return {"task": {"name": type(preset.task).__name__, **dataclasses.asdict(preset.task)},
          "shape": shape, "seed": seed, "batch_size": preset.batch_size,
          "learning_rate": preset.learning_rate, **optional, **extra}


def run_settings(preset: Preset, comparable: dict, name: str) -> dict:
  """``comparable`` plus model ``name``'s schedule: its saved result is current for a call with
  the same run settings (that call, with --resume, reuses it instead of redoing the tests)."""
  return {**comparable, "steps": preset.for_model(name).steps, "eval_every": preset.eval_every,
          "eval_examples": preset.eval_examples,
          "stop_after_perfect_evals": preset.stop_after_perfect_evals}


def writes_files() -> bool:
  """Whether this process writes the results and plots: process 0 (the only process of a
  single-process run), so that several processes do not write the same files."""
  return jax.process_index() == 0


def save_model_result(out_dir: Path, name: str, settings: dict, result: dict) -> None:
  """``out_dir/name/result.json``: one model's row of the table, with the run settings (process 0
  only)."""
  if not writes_files():
    return
  path = out_dir / name / RESULT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
  tmp.replace(path)  # never half a file, even if the call is killed here


def load_model_result(out_dir: Path, name: str) -> dict | None:
  """The saved ``{"settings", "result"}`` of model ``name`` in ``out_dir``, or None."""
  path = out_dir / name / RESULT_FILE
  return json.loads(path.read_text()) if path.exists() else None


def merged_results(out_dir: Path, model_names: Sequence[str], comparable: dict) -> dict:
  """Every model's saved result in ``out_dir`` (in ``model_names`` order) whose settings agree
  with ``comparable``; results saved with other settings are left out, with a note printed."""
  results = {}
  for name in model_names:
    saved = load_model_result(out_dir, name)
    if saved is None:
      continue
    keys = set(comparable) | (OPTIONAL_SETTINGS & set(saved["settings"]))
    theirs = {k: saved["settings"].get(k) for k in keys}
    if theirs != {k: comparable.get(k) for k in keys}:
      differ = sorted(k for k in keys if theirs[k] != comparable.get(k))
      print(f"note: {out_dir / name / RESULT_FILE} left out of the table: it was made with other "
            f"settings ({', '.join(differ)})")
      continue
    results[name] = saved["result"]
  return results


def train_each(preset: Preset, out_dir: Path, comparable: dict,
               test: Callable[[str, Any], dict], *, seed: int, resume: bool, progress: bool,
               max_train_seconds: float | None = None) -> None:
  """Trains every model of ``preset`` in order and saves its row (``save_model_result``): the
  training fields every task records, plus ``test(name, result)``'s. With ``resume``, a model
  whose saved row has this call's settings (:func:`run_settings` of ``comparable``) is reused; a
  model stopped by ``max_train_seconds`` gets no row, and no later model starts (rerun with
  ``resume``)."""
  for i, name in enumerate(preset.models):
    current = run_settings(preset, comparable, name)
    saved = load_model_result(out_dir, name)
    if resume and saved is not None and saved["settings"] == current:
      print(f"{name}: already has a result with these settings ({out_dir / name / RESULT_FILE}); "
            "reusing it")
      continue
    res = train_model(preset, name, out_dir, seed=seed, resume=resume, progress=progress,
                      max_seconds=max_train_seconds)
    print(describe_stop(name, res, preset))
    if not res.complete:
      left = list(preset.models[i + 1:])
      print(f"{name} has no result yet" + (f"; not started: {left}" if left else "")
            + ". Rerun with --resume to continue.")
      return
    mine = preset.for_model(name)
    save_model_result(out_dir, name, current, {
        "label": models.LABELS[name], "params": models.count_params(res.model),
        "steps": mine.steps, "learning_rate": mine.learning_rate,
        "stopped_at_step": res.stopped_at_step,
        "learned_at_step": res.learned_at_step, "stop_reason": res.stop_reason,
        "train_seconds": round(training_seconds(res.records), 1), **test(name, res)})


def histories(out_dir: Path, results: dict) -> dict[str, list[dict[str, Any]]]:
  """Each result's metrics records (``out_dir/<model>/metrics.jsonl``), by label."""
  return {r["label"]: train.read_records(out_dir / name / "metrics.jsonl")
          for name, r in results.items()}


def training_seconds(records: list[dict[str, Any]]) -> float:
  """Training time over every call of a run (the last ``"train"`` record's ``time_s``)."""
  return max((r["time_s"] for r in records if r["kind"] == "train"), default=0.0)


def write_results(out_dir: Path, preset: Preset, seed: int, results: dict, started: float,
                  text: str) -> None:
  """``results.md`` (``text``) and ``results.json`` (the task, shape, schedule and ``results``);
  process 0 only."""
  if not writes_files():
    return
  (out_dir / "results.md").write_text(f"{text}\n")
  (out_dir / "results.json").write_text(json.dumps(
      {"task": dataclasses.asdict(preset.task), "shape": dataclasses.asdict(preset.shape),
       "seed": seed, "batch_size": preset.batch_size, "learning_rate": preset.learning_rate,
       "model_learning_rates": dict(preset.model_learning_rates),
       "lr_schedule": preset.lr_schedule, "warmup_steps": preset.warmup_steps,
       "decay_steps": preset.decay_steps, "grad_clip": preset.grad_clip,
       "eval_every": preset.eval_every,
       "stop_after_perfect_evals": preset.stop_after_perfect_evals,
       "models": results, "wall_seconds": round(time.perf_counter() - started, 1)}, indent=2))


def devices(tabulated: bool = False) -> str:
  """``"<count> <platform> device(s)"``, for the results' header; ``tabulated``: the rows were
  trained by earlier calls, so this process's devices say nothing about them."""
  if tabulated:
    return "rows tabulated from earlier runs"
  return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"


def main(task: str, run: Callable[..., dict], preset: Preset) -> None:
  """Runs ``run(preset, out_dir, ...)`` with the common flags; the default out_dir is
  ``runs/<task>_<preset>``. Joins the other processes first when launched as several."""
  parallel.initialize_distributed()
  out_dir = FLAGS.out_dir or f"runs/{task}_{FLAGS.preset}"
  run(preset, out_dir, seed=FLAGS.seed, resume=FLAGS.resume, progress=FLAGS.progress,
      max_train_seconds=FLAGS.max_train_seconds, tabulate_only=FLAGS.tabulate_only)
