"""PyTorch Mamba checkpoints as a :class:`~ssmax.nn.MambaLM`: Hugging Face ``transformers`` and
``mamba_ssm``.

Both formats are a directory read and written by :mod:`ssmax.io.files`. They differ in the config
keys and in one tensor name:

=========================  ==================================  ==================================
                           ``transformers`` (MambaForCausalLM)  ``mamba_ssm`` (MambaLMHeadModel)
=========================  ==================================  ==================================
config                     ``hidden_size``, ``num_hidden_      ``d_model``, ``n_layer``,
                           layers``, ``state_size``, ``expand``, ``vocab_size``, ``ssm_cfg`` (mixer
                           ``conv_kernel``, ``time_step_rank``, keyword arguments), ``rms_norm``,
                           ``use_bias``, ``use_conv_bias``,     ``residual_in_fp32``,
                           ``layer_norm_epsilon``,              ``pad_vocab_size_multiple``,
                           ``vocab_size`` (already padded),     ``tie_embeddings``
                           ``tie_word_embeddings``
embedding                  ``backbone.embeddings.weight``       ``backbone.embedding.weight``
tied head                  ``lm_head.weight`` left out          ``lm_head.weight`` kept (a copy)
=========================  ==================================  ==================================

Everything else is shared: ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.
{in_proj,conv1d,x_proj,dt_proj,out_proj}.{weight,bias}``, ``...mixer.A_log``, ``...mixer.D``,
``backbone.norm_f.weight``, ``lm_head.weight``. PyTorch stores a Linear weight as ``(out, in)`` and
the depthwise ``conv1d`` weight as ``(d_inner, 1, d_conv)``; Flax wants ``(in, out)`` and
``(d_conv, 1, d_inner)``, so the layouts are converted here and nowhere else (the table in
:mod:`ssmax.nn.mixer` lists every parameter).

Vocabulary padding: the model's embedding has ``padded_vocab_size`` rows (``vocab_size`` rounded up
to ``pad_vocab_size_multiple``). A checkpoint may hold ``vocab_size`` rows or already the padded
count; missing padding rows are filled with zeros. :func:`save_pretrained` writes all padded rows
and ``vocab_size = padded_vocab_size``, as ``transformers``' own conversion of the official
checkpoints does (its model has no padding of its own), and keeps the real vocabulary in the extra
key ``unpadded_vocab_size`` (``transformers`` keeps it as a config attribute and ignores it), which
:func:`load_pretrained` reads back: ``config.vocab_size`` survives the round trip, so sampling
never draws a padding id.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssmax.io import files
from ssmax.io.files import read_config, read_tensors
from ssmax.nn.config import MambaConfig

# mamba_ssm ``Mamba`` keyword -> MambaConfig field; others that are fine to ignore.
_SSM_CFG_KEYS = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
                 "dt_min": "dt_min", "dt_max": "dt_max", "dt_init": "dt_init",
                 "dt_scale": "dt_scale", "dt_init_floor": "dt_init_floor",
                 "conv_bias": "conv_bias", "bias": "bias"}
_SSM_CFG_IGNORED = {"use_fast_path", "layer_idx", "device", "dtype"}


# ----------------------------------------------------------------------------------------------
# Public API.


def load_pretrained(model_cls, path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    scan_backend: str = "auto"):
  """Reads a ``transformers`` or ``mamba_ssm`` Mamba checkpoint directory into a model.

  ``MambaLM.from_pretrained(path, ...)`` is this with ``model_cls=MambaLM``.

  Args:
    model_cls: the model class, built as ``model_cls(config, rngs=...)``.
    path: directory with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (or
      their sharded ``*.index.json`` forms). ``.bin`` files need PyTorch.
    dtype: compute dtype of the model.
    param_dtype: dtype the parameters are cast to (whatever the checkpoint stores).
    scan_backend: backend for :func:`ssmax.selective_scan`.

  Returns:
    The model, with ``config.vocab_size`` the checkpoint's and logits over
    ``config.padded_vocab_size``.

  Raises:
    ValueError: on an unknown or unsupported config, or when tensors are missing, unexpected or
      of the wrong shape (all of them named in one message).
    FileNotFoundError: when the directory has no config or no weights.
    ImportError: for a ``.bin`` checkpoint without PyTorch installed.
  """
  path = pathlib.Path(os.fspath(path))
  config = config_from_dict(read_config(path), dtype=dtype, param_dtype=param_dtype,
                            scan_backend=scan_backend)
  tensors = read_tensors(path)
  abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  arrays = flax_arrays(tensors, config, nnx.to_flat_state(state))
  flat = [(p, v.replace(jnp.asarray(arrays[p], v.get_value().dtype)))
          for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model, path) -> pathlib.Path:
  """Writes ``model`` in the ``transformers`` format: ``config.json`` and ``model.safetensors``.

  The directory loads with ``transformers.MambaForCausalLM.from_pretrained`` and with
  :func:`load_pretrained`. Tensors keep the model's parameter dtype.

  Args:
    model: a :class:`MambaLM` with an RMSNorm, gated, selective configuration (the ones
      ``transformers`` can express).
    path: directory to write; created if missing, files in it overwritten.

  Returns:
    ``path`` as a ``pathlib.Path``.

  Raises:
    ValueError: if ``model`` is not a :class:`MambaLM` or its config has no ``transformers`` form.
  """
  if not isinstance(getattr(model, "config", None), MambaConfig):
    raise ValueError(f"model must be a MambaLM; got {type(model).__name__}")
  hf_config = transformers_config(model.config)
  tensors = {}
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, to_torch = _torch_name(p)
    tensors[_transformers_name(name)] = np.ascontiguousarray(to_torch(np.asarray(v.get_value())))
  return files.write(path, tensors, hf_config)


# ----------------------------------------------------------------------------------------------
# Configs.


def config_from_dict(cfg: dict[str, Any], **overrides) -> MambaConfig:
  """A :class:`MambaConfig` from either format's ``config.json``; ``overrides`` set more fields.

  The format is told by its keys: ``d_model`` for ``mamba_ssm``, ``hidden_size`` for
  ``transformers``.

  Raises:
    ValueError: for another model type, a Mamba-2 or hybrid (attention or MLP) config, a
      non-SiLU activation, or a ``mamba_ssm`` ``ssm_cfg`` key this model has no field for.
  """
  if not isinstance(cfg, dict):
    raise ValueError(f"cfg must be a dict; got {type(cfg).__name__}")
  model_type = cfg.get("model_type", "mamba")
  if model_type != "mamba":
    raise ValueError(f"config model_type must be 'mamba'; got {model_type!r}")
  if "d_model" in cfg:  # mamba_ssm writes no model_type
    fields = _fields_from_mamba_ssm(cfg)
  elif "hidden_size" in cfg:
    if "model_type" not in cfg:  # every transformers config names it; many models have hidden_size
      raise ValueError("config has 'hidden_size' (the transformers format) but no 'model_type'; "
                       "a transformers Mamba config has model_type 'mamba'")
    fields = _fields_from_transformers(cfg)
  else:
    raise ValueError("config is neither the transformers format (no 'hidden_size') nor the "
                     f"mamba_ssm format (no 'd_model'); got keys {sorted(cfg)}")
  return MambaConfig(**fields, **overrides)


def _fields_from_mamba_ssm(cfg):
  for key in ("d_model", "n_layer", "vocab_size"):
    if key not in cfg:
      raise ValueError(f"mamba_ssm config lacks {key!r}; got keys {sorted(cfg)}")
  if cfg.get("d_intermediate", 0):
    raise ValueError(f"config d_intermediate must be 0 (no MLP blocks); got "
                     f"{cfg['d_intermediate']!r}")
  if cfg.get("attn_layer_idx"):
    raise ValueError(f"config attn_layer_idx must be empty (no attention layers); got "
                     f"{cfg['attn_layer_idx']!r}")
  ssm_cfg = dict(cfg.get("ssm_cfg") or {})
  layer = ssm_cfg.pop("layer", "Mamba1")
  if layer != "Mamba1":
    raise ValueError(f"config ssm_cfg.layer must be 'Mamba1'; got {layer!r}")
  unknown = sorted(set(ssm_cfg) - set(_SSM_CFG_KEYS) - _SSM_CFG_IGNORED)
  if unknown:
    raise ValueError(f"config ssm_cfg has keys with no MambaConfig field: {unknown}")
  fields = {_SSM_CFG_KEYS[k]: v for k, v in ssm_cfg.items() if k in _SSM_CFG_KEYS}
  fields.update(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
                rms_norm=cfg.get("rms_norm", True),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
                tie_embeddings=cfg.get("tie_embeddings", True),
                norm_epsilon=cfg.get("norm_epsilon", 1e-5))
  return fields


def _fields_from_transformers(cfg):
  for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
    if key not in cfg:
      raise ValueError(f"transformers config lacks {key!r}; got keys {sorted(cfg)}")
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config hidden_act must be 'silu'; got {act!r}")
  d_model = cfg["hidden_size"]
  expand = cfg.get("expand", 2)
  if "intermediate_size" in cfg and cfg["intermediate_size"] != expand * d_model:
    raise ValueError(f"config intermediate_size must equal expand * hidden_size = "
                     f"{expand * d_model}; got {cfg['intermediate_size']!r}")
  vocab = cfg["vocab_size"]
  if "unpadded_vocab_size" in cfg:  # written by save_pretrained: the real vocabulary
    real = cfg["unpadded_vocab_size"]
    if isinstance(real, bool) or not isinstance(real, int) or not 1 <= real <= _int_or(vocab):
      raise ValueError(f"config unpadded_vocab_size must be an int in [1, vocab_size={vocab!r}]; "
                       f"got {real!r}")
    vocab = real
  fields = dict(d_model=d_model, n_layer=cfg["num_hidden_layers"], vocab_size=vocab,
                d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4),
                expand=expand, dt_rank=cfg.get("time_step_rank", "auto"),
                bias=cfg.get("use_bias", False), conv_bias=cfg.get("use_conv_bias", True),
                norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                tie_embeddings=cfg.get("tie_word_embeddings", True),
                pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8))
  for ours, theirs in (("dt_min", "time_step_min"), ("dt_max", "time_step_max"),
                       ("dt_scale", "time_step_scale"), ("dt_init_floor", "time_step_floor"),
                       ("dt_init", "time_step_init_scheme")):
    if theirs in cfg:
      fields[ours] = cfg[theirs]
  return fields


def _int_or(x, default=0):
  return x if isinstance(x, int) and not isinstance(x, bool) else default


def transformers_config(config: MambaConfig) -> dict[str, Any]:
  """The ``transformers`` ``config.json`` dict of ``config`` (vocab written padded, the real one
  as ``unpadded_vocab_size``).

  Raises:
    ValueError: when ``config`` uses LayerNorm, no gate, or the ``s4d`` SSM, which
      ``transformers``' Mamba cannot express.
  """
  c = config
  for field, want in (("rms_norm", True), ("gated", True), ("ssm", "selective")):
    if getattr(c, field) != want:
      raise ValueError(f"the transformers Mamba format needs config.{field} == {want!r}; got "
                       f"{getattr(c, field)!r}")
  return {
      "architectures": ["MambaForCausalLM"], "model_type": "mamba",
      "vocab_size": c.padded_vocab_size, "pad_vocab_size_multiple": c.pad_vocab_size_multiple,
      "unpadded_vocab_size": c.vocab_size,
      "hidden_size": c.d_model, "num_hidden_layers": c.n_layer, "state_size": c.d_state,
      "expand": c.expand, "intermediate_size": c.d_inner, "conv_kernel": c.d_conv,
      "time_step_rank": c.resolved_dt_rank, "use_bias": c.bias, "use_conv_bias": c.conv_bias,
      "layer_norm_epsilon": c.norm_epsilon, "residual_in_fp32": c.residual_in_fp32,
      "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
      "time_step_min": c.dt_min, "time_step_max": c.dt_max, "time_step_scale": c.dt_scale,
      "time_step_floor": c.dt_init_floor, "time_step_init_scheme": c.dt_init,
      "dtype": jnp.dtype(c.param_dtype).name,
  }


# ----------------------------------------------------------------------------------------------
# Tensors.


def canonical_name(name: str) -> str:
  """A stored tensor name in ``mamba_ssm``'s scheme without ``backbone.``: ``embedding.weight``,
  ``layers.0.mixer.in_proj.weight``, ``norm_f.weight``, ``lm_head.weight``."""
  if name.startswith("backbone."):
    name = name[len("backbone."):]
  return "embedding.weight" if name == "embeddings.weight" else name


def _transformers_name(canonical: str) -> str:
  if canonical == "lm_head.weight":
    return canonical
  return "backbone." + ("embeddings.weight" if canonical == "embedding.weight" else canonical)


def _torch_name(path: tuple):
  """Flax state path -> (canonical PyTorch name, function from the Flax to the PyTorch layout)."""
  if path == ("embedding", "embedding"):
    return "embedding.weight", _identity
  *parents, leaf = path
  prefix = ".".join(str(p) for p in parents)
  if leaf == "kernel":
    return f"{prefix}.weight", (_conv_layout if parents[-1] == "conv1d" else np.transpose)
  if leaf == "scale":  # Flax LayerNorm; PyTorch calls it weight
    return f"{prefix}.weight", _identity
  return ".".join(str(p) for p in path), _identity


def _identity(x):
  return x


def _conv_layout(x):
  """``(d_conv, 1, d_inner)`` <-> ``(d_inner, 1, d_conv)``; its own inverse."""
  return np.transpose(x, (2, 1, 0))


def flax_arrays(tensors: dict[str, np.ndarray], config: MambaConfig, flat_state) -> dict:
  """Maps stored PyTorch tensors onto the model's flat state paths, in the Flax layouts.

  Args:
    tensors: stored name -> array, either naming scheme.
    config: the model's config (for the vocabulary sizes and the tied head).
    flat_state: ``nnx.to_flat_state`` of the model (abstract shapes are enough).

  Returns:
    Dict from state path to a NumPy array of the path's shape.

  Raises:
    ValueError: naming every missing, unexpected or wrongly shaped tensor.
  """
  by_name = {}
  for name, array in tensors.items():
    key = canonical_name(name)
    if key in by_name:
      raise ValueError(f"tensor {name!r} is stored twice (as {key!r} under both naming schemes)")
    by_name[key] = (name, np.asarray(array))

  vocab, padded = config.vocab_size, config.padded_vocab_size
  missing, mismatched, arrays = [], [], {}
  for path, variable in flat_state:
    name, to_torch = _torch_name(path)
    want = tuple(variable.get_value().shape)
    want_torch = to_torch(np.empty(want, np.bool_)).shape
    if name not in by_name:
      missing.append(name if name == "lm_head.weight" else "backbone." + name)
      continue
    stored_name, array = by_name.pop(name)
    if name in ("embedding.weight", "lm_head.weight"):
      # Rows: vocab_size, the padded count, or anything between (already partly padded).
      ok = (array.ndim == 2 and array.shape[1] == want_torch[1]
            and vocab <= array.shape[0] <= padded)
      if ok and array.shape[0] < padded:
        array = np.concatenate([array, np.zeros((padded - array.shape[0], array.shape[1]),
                                                array.dtype)])
      expected = f"({vocab}..{padded}, {want_torch[1]})"
    else:
      ok = array.shape == want_torch
      expected = str(want_torch)
    if not ok:
      mismatched.append(f"{stored_name}: stored {tuple(array.shape)}, expected {expected}")
      continue
    arrays[path] = to_torch(array)  # the layout maps are their own inverses

  # A tied head: mamba_ssm's state dict keeps lm_head.weight as a copy of the embedding.
  if config.tie_embeddings and "lm_head.weight" in by_name:
    stored_name, head = by_name.pop("lm_head.weight")
    emb = arrays.get(("embedding", "embedding"))
    if emb is not None and not (head.shape[1:] == emb.shape[1:] and head.shape[0] <= emb.shape[0]
                                and np.array_equal(head, emb[:head.shape[0]])):
      mismatched.append(f"{stored_name}: differs from the embedding, but the config ties them "
                        "(set tie_embeddings / tie_word_embeddings to false)")
  unexpected = sorted(name for name, _ in by_name.values())
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"missing tensors {missing}")
    if unexpected:
      parts.append(f"unexpected tensors {unexpected}")
    if mismatched:
      parts.append("mismatched shapes [" + "; ".join(mismatched) + "]")
    raise ValueError("checkpoint does not match the config: " + ", ".join(parts))
  return arrays
