"""The Mamba language model's configuration, with the defaults of the official ``MambaConfig``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from ssmax import _checks
from ssmax.scan import dispatch

SSM_KINDS = ("selective", "s4d")
DT_INITS = ("random", "constant")
S4D_INITS = ("real", "lin", "inv")  # S4D-Real, S4D-Lin, S4D-Inv (hippo.s4d_*)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Shape and initialisation of a :class:`~ssmax.nn.MambaLM`.

  The defaults are the official ``mamba_ssm`` ones (``MambaConfig`` plus the ``Mamba`` mixer's
  keyword defaults): the 2.8B model. The 130M model is ``MambaConfig(d_model=768, n_layer=24)``.

  Attributes:
    d_model: width of the residual stream.
    n_layer: number of residual blocks.
    vocab_size: tokenizer vocabulary; the embedding is padded up to ``padded_vocab_size``.
    d_state: SSM state size N per channel.
    d_conv: width of the depthwise causal convolution.
    expand: inner width ``d_inner = expand * d_model``.
    dt_rank: rank of the Δ projection; ``"auto"`` is ``ceil(d_model / 16)``.
    dt_min, dt_max: Δ is initialised log-uniform in ``[dt_min, dt_max]``.
    dt_init: ``"random"`` (uniform ``dt_proj`` weight in ``±dt_rank**-0.5 * dt_scale``) or
      ``"constant"`` (the weight equal to that bound).
    dt_scale: scale of the ``dt_proj`` weight init.
    dt_init_floor: lower clamp of the sampled Δ.
    conv_bias: bias in the depthwise convolution.
    bias: bias in ``in_proj`` and ``out_proj``.
    rms_norm: RMSNorm (True) or LayerNorm (False).
    norm_epsilon: epsilon of the norms.
    residual_in_fp32: keep the residual stream in float32 whatever ``dtype`` is.
    pad_vocab_size_multiple: pad the vocabulary up to a multiple of this.
    tie_embeddings: the LM head is the transposed embedding.
    gated: multiply the SSM output by ``SiLU(z)``; False drops the ``z`` branch.
    ssm: ``"selective"`` (Mamba's S6) or ``"s4d"`` (an LTI diagonal SSM, convolution mode).
    s4d_init: with ``ssm="s4d"``: ``"real"`` (S4D-Real), ``"lin"`` or ``"inv"`` (complex).
    scan_backend: backend handed to :func:`ssmax.selective_scan`.
    sequence_axis: mesh axis the length is split over when the model runs inside
      ``jax.shard_map`` (see :mod:`ssmax.parallel`); None when every device holds whole sequences.
    dtype: compute dtype of activations.
    param_dtype: dtype of the parameters.
  """

  d_model: int = 2560
  n_layer: int = 64
  vocab_size: int = 50277
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init: str = "random"
  dt_scale: float = 1.0
  dt_init_floor: float = 1e-4
  conv_bias: bool = True
  bias: bool = False
  rms_norm: bool = True
  norm_epsilon: float = 1e-5
  residual_in_fp32: bool = True
  pad_vocab_size_multiple: int = 8
  tie_embeddings: bool = True
  gated: bool = True
  ssm: str = "selective"
  s4d_init: str = "real"
  scan_backend: str = "auto"
  sequence_axis: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                 "pad_vocab_size_multiple"):
      _checks.positive_int(name, getattr(self, name))
    if self.dt_rank != "auto":
      _checks.positive_int("dt_rank", self.dt_rank)
    check_dt_range(self.dt_min, self.dt_max, self.dt_init_floor)
    _checks.finite_number("dt_scale", self.dt_scale, positive=True)
    _checks.finite_number("norm_epsilon", self.norm_epsilon, positive=True)
    _checks.one_of("dt_init", self.dt_init, DT_INITS)
    _checks.one_of("ssm", self.ssm, SSM_KINDS)
    _checks.one_of("s4d_init", self.s4d_init, S4D_INITS)
    dispatch.parse(self.scan_backend, "scan_backend")
    if self.sequence_axis is not None and not isinstance(self.sequence_axis, str):
      raise ValueError(f"sequence_axis must be a mesh axis name (str) or None; got "
                       f"{self.sequence_axis!r}")
    for name in ("dtype", "param_dtype"):
      if not jnp.issubdtype(getattr(self, name), jnp.floating):
        raise ValueError(f"{name} must be a floating-point dtype; got {getattr(self, name)!r}")

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def resolved_dt_rank(self) -> int:
    return resolve_dt_rank(self.dt_rank, self.d_model)

  @property
  def padded_vocab_size(self) -> int:
    m = self.pad_vocab_size_multiple
    return -(-self.vocab_size // m) * m


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
  """``"auto"`` -> ``ceil(d_model / 16)``, as the official mixer."""
  return math.ceil(d_model / 16) if dt_rank == "auto" else _checks.positive_int("dt_rank", dt_rank)


def check_dt_range(dt_min: float, dt_max: float, dt_init_floor: float = 0.0) -> None:
  """Δ's init range must be finite, positive and ordered (the log-uniform sample takes logs of
  both)."""
  _checks.finite_number("dt_min", dt_min, positive=True)
  _checks.finite_number("dt_max", dt_max, positive=True)
  _checks.finite_number("dt_init_floor", dt_init_floor, nonnegative=True)
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got dt_min={dt_min!r}, "
                     f"dt_max={dt_max!r}")
  if not dt_init_floor >= 0:
    raise ValueError(f"dt_init_floor must be >= 0; got {dt_init_floor!r}")
