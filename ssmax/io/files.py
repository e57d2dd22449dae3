"""Checkpoint files of the PyTorch Mamba implementations, read and written as plain data.

A checkpoint directory holds ``config.json`` and the weights in ``model.safetensors`` or
``pytorch_model.bin``, or shards of either listed in a ``*.index.json``. This module turns such a
directory into a config dict and a dict of NumPy arrays under their stored names, and back; what
the names and layouts mean for a model is :mod:`ssmax.nn.pretrained`'s business.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, so safetensors can read BF16 tensors
import numpy as np

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def read_config(path) -> dict[str, Any]:
  """The ``config.json`` of a checkpoint directory as a dict.

  Raises:
    FileNotFoundError: when ``path`` has no ``config.json``.
    ValueError: naming the file, when it is not a JSON object.
  """
  file = pathlib.Path(os.fspath(path)) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {file.parent}")
  return _read_json_object(file)


def _read_json_object(file: pathlib.Path) -> dict[str, Any]:
  try:
    value = json.loads(file.read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{file} must hold a JSON object; got {type(value).__name__}")
  return value


def read_tensors(path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as NumPy arrays, under their stored names.

  Looks for ``model.safetensors``, then ``pytorch_model.bin``, then the sharded forms listed in
  ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``.

  Raises:
    FileNotFoundError: when there are no weights, or a shard the index names is missing.
    ValueError: naming the file, for a truncated or corrupt weights file, an index without a
      ``weight_map`` of file names, or an index naming a shard outside ``path`` (``../``, an
      absolute path or a link out of it), which is refused rather than read.
  """
  path = pathlib.Path(os.fspath(path))
  if (path / SAFETENSORS_FILE).is_file():
    return _read_safetensors(path / SAFETENSORS_FILE)
  if (path / TORCH_FILE).is_file():
    return _read_torch(path / TORCH_FILE)
  for index, reader in ((SAFETENSORS_INDEX, _read_safetensors), (TORCH_INDEX, _read_torch)):
    if (path / index).is_file():
      tensors = {}
      for shard in _shards(path, path / index):
        tensors.update(reader(shard))
      return tensors
  raise FileNotFoundError(f"no {SAFETENSORS_FILE}, {TORCH_FILE} or sharded index in {path}")


def _shards(root: pathlib.Path, index: pathlib.Path) -> list[pathlib.Path]:
  """The shard files an index names, each checked to lie inside ``root``."""
  weight_map = _read_json_object(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map or not all(
      isinstance(v, str) and v for v in weight_map.values()):
    raise ValueError(f"{index} must have a non-empty 'weight_map' from tensor names to shard file "
                     f"names; got {type(weight_map).__name__}")
  inside = root.resolve()
  shards = []
  for name in sorted(set(weight_map.values())):
    shard = root / name
    if pathlib.PurePath(name).is_absolute() or inside not in shard.resolve().parents:
      raise ValueError(f"{index} names shard {name!r}, which is outside {root}; refusing to read "
                       "it")
    if not shard.is_file():
      raise FileNotFoundError(f"shard {name!r} named by {index} does not exist")
    shards.append(shard)
  return shards


def _safetensors_numpy():
  try:
    import safetensors.numpy
  except ImportError as e:
    raise ImportError("reading and writing model.safetensors needs the safetensors package "
                      "(pip install safetensors)") from e
  return safetensors.numpy


def _read_safetensors(file) -> dict[str, np.ndarray]:
  reader = _safetensors_numpy()
  try:
    return reader.load_file(file)
  except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad files
    raise ValueError(f"cannot read {file}: it is truncated or not a safetensors file "
                     f"({type(e).__name__}: {e})") from e


def _read_torch(file) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {file} needs PyTorch (pip install torch), or convert the "
                      "checkpoint to model.safetensors") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # weights_only refused a pickle that is not plain tensors
    raise ValueError(f"refusing to load {file}: it holds objects other than tensors ({e})") from e
  except (OSError, RuntimeError, EOFError, ValueError) as e:
    raise ValueError(f"cannot read {file}: it is truncated or not a PyTorch checkpoint "
                     f"({type(e).__name__}: {e})") from e
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()):
    raise ValueError(f"{file} must hold a dict from names to tensors (a state dict); got "
                     f"{type(state).__name__}")
  # NumPy has no bfloat16 from torch; upcasting is exact.
  return {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in state.items()}


def write(path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> pathlib.Path:
  """Writes ``config.json`` and ``model.safetensors`` into directory ``path`` (created if missing;
  files in it overwritten). Returns ``path`` as a ``pathlib.Path``."""
  path = pathlib.Path(os.fspath(path))
  path.mkdir(parents=True, exist_ok=True)
  _safetensors_numpy().save_file(tensors, path / SAFETENSORS_FILE, metadata={"format": "pt"})
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return path
