"""Training checkpoints: Orbax save and restore of an NNX model's state and its optimizer's.

A checkpoint directory holds one subdirectory per training step, written by
``orbax.checkpoint.CheckpointManager``; each step stores the model's ``nnx.state`` under the item
``"model"`` and, when given, the optimizer's under ``"optimizer"``. On restore, arrays take the
dtypes and shardings of the arrays they replace::

    ssmax.checkpoint.save(ckpt_dir, model, optimizer, step=1000)
    ...
    step = ssmax.checkpoint.restore(ckpt_dir, model, optimizer)  # latest step, in place

For interchange with PyTorch checkpoints see :mod:`ssmax.io.files` and
:mod:`ssmax.nn.pretrained`.
"""

from __future__ import annotations

import os
import pathlib

import orbax.checkpoint as ocp
from flax import nnx

from ssmax import _checks

MODEL = "model"
OPTIMIZER = "optimizer"
TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a step Orbax has not finished writing


def _manager(directory, max_to_keep=None, create=False) -> ocp.CheckpointManager:
  directory = pathlib.Path(os.fspath(directory)).absolute()  # Orbax wants absolute paths
  if create:
    # Checked here: Orbax would fail in a background thread and then hang the process at exit.
    for p in (directory, *directory.parents):
      if p.exists() and not p.is_dir():
        raise ValueError(f"directory {directory} cannot be created: {p} is a file")
    try:
      directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"directory {directory} cannot be created: {e}") from e
  elif not directory.is_dir():
    raise ValueError(f"directory {directory} does not exist")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(directory, options=options)


def interrupted_saves(directory) -> list[pathlib.Path]:
  """Step directories of ``directory`` left by a save that never finished (Orbax's
  ``*.orbax-checkpoint-tmp*``), which :func:`restore` and :func:`latest_step` do not see."""
  directory = pathlib.Path(os.fspath(directory))
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name)


def save(directory, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *, step: int = 0,
         max_to_keep: int | None = None) -> pathlib.Path:
  """Saves ``nnx.state(model)`` (and ``nnx.state(optimizer)``) as step ``step`` of ``directory``.

  Args:
    directory: checkpoint root; created if missing. Each step goes to ``directory/<step>``.
    model: any ``flax.nnx.Module`` (e.g. :class:`ssmax.nn.MambaLM`).
    optimizer: optional ``nnx.Optimizer`` whose state (moments, step count) is saved alongside.
    step: non-negative training step that names the checkpoint; must not exist yet.
    max_to_keep: keep only the newest this many steps (``None`` keeps all).

  Returns:
    The path of the step's directory.

  Raises:
    ValueError: if ``step`` is negative or already saved, ``model``/``optimizer`` have the
      wrong type, or ``directory`` cannot be a directory (it or a parent is a file).
  """
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"step must be a non-negative int; got {step!r}")
  if max_to_keep is not None:
    _checks.positive_int("max_to_keep", max_to_keep)
  _check_modules(model, optimizer)
  items = {MODEL: ocp.args.StandardSave(nnx.state(model))}
  if optimizer is not None:
    items[OPTIMIZER] = ocp.args.StandardSave(nnx.state(optimizer))
  with _manager(directory, max_to_keep, create=True) as manager:
    if step in manager.all_steps():
      raise ValueError(f"step {step} already exists in {manager.directory}; pick a new step")
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
    return pathlib.Path(manager.directory) / str(step)


def restore(directory, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
            step: int | None = None) -> int:
  """Restores a step of ``directory`` into ``model`` (and ``optimizer``) in place.

  The model (and optimizer) must have the structure and shapes of the saved ones, e.g. freshly
  built from the same config; restored arrays take the dtypes and shardings of the arrays they
  replace.

  Args:
    directory: checkpoint root written by :func:`save`.
    model: module to overwrite.
    optimizer: optional ``nnx.Optimizer`` to overwrite; the checkpoint must contain one.
    step: step to restore; ``None`` takes the latest.

  Returns:
    The restored step.

  Raises:
    ValueError: if the directory has no checkpoint, ``step`` is not in it, an optimizer is
      requested from a checkpoint saved without one, or the structures differ.
    CorruptCheckpointError: (a ``ValueError``) naming the directory and step, when the step's
      files are damaged; an earlier step may still restore (see :func:`all_steps`).
  """
  _check_modules(model, optimizer)
  with _manager(directory) as manager:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"directory {manager.directory} holds no checkpoint")
    if step is None:
      step = manager.latest_step()
    elif step not in steps:
      raise ValueError(f"step {step!r} is not in {manager.directory}; saved steps are "
                       f"{sorted(steps)}")
    where = f"checkpoint step {step} in {manager.directory}"
    try:
      saved_items = manager.item_metadata(step).keys()
    except Exception as e:  # an emptied or damaged step folder
      raise CorruptCheckpointError(f"{where} is corrupt (cannot read its metadata: "
                                   f"{type(e).__name__}: {e})") from e
    if MODEL not in saved_items:
      raise CorruptCheckpointError(f"{where} is corrupt: it has no {MODEL!r} item (items: "
                                   f"{sorted(saved_items)})")
    targets = {MODEL: model}
    if optimizer is not None:
      if OPTIMIZER not in saved_items:
        raise ValueError(f"optimizer given, but step {step} in {manager.directory} was saved "
                         "without optimizer state")
      targets[OPTIMIZER] = optimizer
    args = {name: ocp.args.StandardRestore(nnx.state(module)) for name, module in targets.items()}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError) as e:
      if _structure_error(e):
        raise ValueError(f"{where} does not match the given model/optimizer structure: "
                         f"{e}") from e
      raise CorruptCheckpointError(f"{where} is corrupt: {type(e).__name__}: {e}") from e
    except Exception as e:  # TensorStore errors on deleted, truncated or altered data files
      raise CorruptCheckpointError(f"{where} is corrupt: {type(e).__name__}: {e}") from e
  for name, module in targets.items():
    nnx.update(module, restored[name])
  return step


class CorruptCheckpointError(ValueError):
  """A saved step that cannot be read back: data files deleted, truncated or altered, or the step
  folder emptied. The message names the directory and the step."""


# TensorStore's status codes and messages when it cannot read what the metadata promises.
_DAMAGE = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "Error opening", "Error reading")


def _structure_error(e: Exception) -> bool:
  """Whether Orbax's error says the target's tree differs from the saved one (not damage)."""
  text = str(e)
  if any(k in text for k in _DAMAGE):
    return False
  return any(k in text.lower() for k in ("structure", "shape", "mismatch", "tree", "not found in"))


def latest_step(directory) -> int | None:
  """The newest step saved in ``directory``, or ``None`` when there is none."""
  with _manager(directory) as manager:
    return manager.latest_step()


def all_steps(directory) -> list[int]:
  """The steps saved in ``directory``, oldest first (interrupted saves are not steps)."""
  with _manager(directory) as manager:
    return sorted(manager.all_steps())


def _check_modules(model, optimizer):
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be a flax.nnx.Module; got {type(model).__name__}")
  if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
    raise ValueError("optimizer must be a flax.nnx.Optimizer or None; got "
                     f"{type(optimizer).__name__}")
