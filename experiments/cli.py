"""Command-line flags shared by the synthetic-task entry points (absl)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import app, flags

from experiments import models

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
