"""What the synthetic-task entry points share: their presets, absl flags, training one model of a
preset, and writing the results."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from absl import app, flags

from experiments import models, train

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

# Flags whose value, when given, replaces the preset's field of the same name.
PRESET_FIELDS = ("steps", "batch_size", "learning_rate", "checkpoint_every", "eval_every",
                 "eval_examples")


def define_flags(task: str, presets: Sequence[str], model_names: Sequence[str]) -> None:
  """Defines the flags every task entry point has; ``task`` names the default output folder."""
  flags.DEFINE_enum("preset", "quick", list(presets), "quick: CPU minutes; paper: appendix E.1 sizes.")
  flags.DEFINE_list("models", None, f"Models to train, from {list(model_names)}; default: the preset's.")
  flags.DEFINE_integer("steps", None, "Training steps per model; default: the preset's.")
  flags.DEFINE_integer("batch_size", None, "Global batch size; default: the preset's.")
  flags.DEFINE_float("learning_rate", None, "Constant Adam learning rate; default: the preset's.")
  flags.DEFINE_integer("seed", 0, "Seed of the parameters, the data stream and the test sets.")
  flags.DEFINE_string("out_dir", None, f"Output directory; default runs/{task}_<preset>.")
  flags.DEFINE_bool("resume", False, "Continue each model from its latest checkpoint in --out_dir.")
  flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints (0: none); default: the preset's.")
  flags.DEFINE_integer("eval_every", None, "Steps between validation evaluations; default: the preset's.")
  flags.DEFINE_integer("eval_examples", None, "Size of the validation set at the training length; default: "
                       "the preset's.")
  flags.DEFINE_string("scan_backend", None, "Selective scan backend (auto, sequential, associative, "
                      "pallas); default: the preset's.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def preset_changes(preset, model_names: Sequence[str], extra_fields: Sequence[str] = ()) -> dict:
  """The preset fields the command line overrides, checked; for ``dataclasses.replace``."""
  names = PRESET_FIELDS + tuple(extra_fields)
  changes = {k: getattr(FLAGS, k) for k in names if getattr(FLAGS, k) is not None}
  if FLAGS.models:
    for name in FLAGS.models:
      if name not in model_names:
        raise app.UsageError(f"--models must be among {list(model_names)}; got {name!r}")
    changes["models"] = tuple(FLAGS.models)
  if FLAGS.scan_backend:
    changes["shape"] = dataclasses.replace(preset.shape, scan_backend=FLAGS.scan_backend)
  if changes.get("checkpoint_every", 0) % preset.log_every:
    raise app.UsageError(f"--checkpoint_every must be a multiple of {preset.log_every}")
  return changes


def train_model(preset: Preset, name: str, out_dir: Path, *, seed: int, resume: bool,
                progress: bool) -> train.TrainResult:
  """Trains model ``name`` of ``preset`` on its task, into ``out_dir/name``."""
  config = train.TrainConfig(steps=preset.steps, batch_size=preset.batch_size,
                             learning_rate=preset.learning_rate, seed=seed,
                             log_every=preset.log_every, eval_every=preset.eval_every,
                             eval_examples=preset.eval_examples,
                             checkpoint_every=preset.checkpoint_every, resume=resume,
                             progress=progress)
  return train.train(lambda rngs: models.make_model(name, preset.shape, rngs), preset.task, config,
                     out_dir / name, name=name)


def write_results(out_dir: Path, preset: Preset, seed: int, results: dict, started: float,
                  text: str) -> None:
  """``results.md`` (``text``) and ``results.json`` (the task, shape, schedule and ``results``)."""
  (out_dir / "results.md").write_text(f"{text}\n")
  (out_dir / "results.json").write_text(json.dumps(
      {"task": dataclasses.asdict(preset.task), "shape": dataclasses.asdict(preset.shape),
       "seed": seed, "batch_size": preset.batch_size, "learning_rate": preset.learning_rate,
       "models": results, "wall_seconds": round(time.perf_counter() - started, 1)}, indent=2))


def devices() -> str:
  """``"<count> <platform> device(s)"``, for the results' header."""
  return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"


def main(task: str, run: Callable[..., dict], preset: Preset) -> None:
  """Runs ``run(preset, out_dir, ...)`` with the common flags; the default out_dir is
  ``runs/<task>_<preset>``."""
  out_dir = FLAGS.out_dir or f"runs/{task}_{FLAGS.preset}"
  run(preset, out_dir, seed=FLAGS.seed, resume=FLAGS.resume, progress=FLAGS.progress)
