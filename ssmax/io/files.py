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
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, so safetensors can read BF16 tensors
import numpy as np

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def read_config(path) -> dict[str, Any]:
  """The ``config.json`` of a checkpoint directory as a dict."""
  file = pathlib.Path(os.fspath(path)) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {file.parent}")
  return json.loads(file.read_text())


def read_tensors(path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as NumPy arrays, under their stored names.

  Looks for ``model.safetensors``, then ``pytorch_model.bin``, then the sharded forms listed in
  ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``.
  """
  path = pathlib.Path(os.fspath(path))
  if (path / SAFETENSORS_FILE).is_file():
    return _read_safetensors(path / SAFETENSORS_FILE)
  if (path / TORCH_FILE).is_file():
    return _read_torch(path / TORCH_FILE)
  for index, reader in ((SAFETENSORS_INDEX, _read_safetensors), (TORCH_INDEX, _read_torch)):
    if (path / index).is_file():
      shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(reader(path / shard))
      return tensors
  raise FileNotFoundError(f"no {SAFETENSORS_FILE}, {TORCH_FILE} or sharded index in {path}")


def _safetensors_numpy():
  try:
    import safetensors.numpy
  except ImportError as e:
    raise ImportError("reading and writing model.safetensors needs the safetensors package "
                      "(pip install safetensors)") from e
  return safetensors.numpy


def _read_safetensors(file) -> dict[str, np.ndarray]:
  return _safetensors_numpy().load_file(file)


def _read_torch(file) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {file} needs PyTorch (pip install torch), or convert the "
                      "checkpoint to model.safetensors") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
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
