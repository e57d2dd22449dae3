"""The models compared on the synthetic tasks, built from :mod:`ssmax.nn` and the Transformer baseline.

The rows of the Mamba paper's Table 1 (Selective Copying) differ in the inner SSM and in the gate:

=============  =================================================================================
name           model
=============  =================================================================================
``s4``         no gate, LTI inner SSM (S4D-Real, convolution mode): ``MambaLM(gated=False, ssm="s4d")``
``s6``         no gate, selective inner SSM: ``MambaLM(gated=False, ssm="selective")``
``mamba_s4``   the Mamba block with an LTI inner SSM: ``MambaLM(gated=True, ssm="s4d")``
``mamba_s6``   the Mamba block (Mamba itself): ``MambaLM(gated=True, ssm="selective")``
``mha_rope``   Transformer, rotary positions (the paper's MHA-RoPE baseline for Induction Heads)
``mha_abs``    Transformer, learned absolute positions (the paper's MHA-Abs)
=============  =================================================================================

Every model is an LM over the task's tokens: embedding, ``n_layer`` pre-norm residual blocks
(RMSNorm), final norm, tied head. "No gate" drops only the ``SiLU(z)`` branch of the Mamba mixer; the
input projection, the short causal convolution and the output projection stay, so the rows isolate
the two factors of Table 1.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from experiments.transformer import TransformerConfig, TransformerLM
from ssmax import _checks
from ssmax.nn import MambaConfig, MambaLM

SSM_MODELS = {
    "s4": dict(gated=False, ssm="s4d"),
    "s6": dict(gated=False, ssm="selective"),
    "mamba_s4": dict(gated=True, ssm="s4d"),
    "mamba_s6": dict(gated=True, ssm="selective"),
}
TRANSFORMER_MODELS = {"mha_rope": "rotary", "mha_abs": "absolute"}
MODEL_NAMES = tuple(SSM_MODELS) + tuple(TRANSFORMER_MODELS)
LABELS = {"s4": "S4 (no gate)", "s6": "S6 (no gate)", "mamba_s4": "Mamba block, S4",
          "mamba_s6": "Mamba block, S6 (Mamba)", "mha_rope": "MHA-RoPE", "mha_abs": "MHA-Abs"}


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """Sizes shared by every model of an experiment.

  Attributes:
    vocab_size: the task's vocabulary.
    d_model: residual width (the paper: 64).
    n_layer: blocks (the paper: 2).
    d_state: SSM state size N (Mamba's default 16).
    expand: Mamba's inner expansion.
    n_head: attention heads of the Transformer.
    max_len: the Transformer's absolute position table (and default cache) size.
    scan_backend: :func:`ssmax.selective_scan` backend of the selective models.
  """

  vocab_size: int = 16
  d_model: int = 64
  n_layer: int = 2
  d_state: int = 16
  expand: int = 2
  n_head: int = 8
  max_len: int = 2048
  scan_backend: str = "auto"


def make_model(name: str, shape: ModelShape, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model called ``name`` (one of :data:`MODEL_NAMES`) with ``shape``.

  Returns an NNX module mapping ``(batch, length)`` int32 tokens to ``(batch, length, vocab)``
  float32 logits (the Mamba models pad the vocabulary to a multiple of 8, as ``mamba_ssm``).
  """
  _checks.one_of("name", name, MODEL_NAMES)
  if name in SSM_MODELS:
    config = MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                         d_state=shape.d_state, expand=shape.expand, scan_backend=shape.scan_backend,
                         **SSM_MODELS[name])
    return MambaLM(config, rngs=rngs)
  config = TransformerConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, n_layer=shape.n_layer,
                             n_head=shape.n_head, positions=TRANSFORMER_MODELS[name], max_len=shape.max_len)
  return TransformerLM(config, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def init_state(model: nnx.Module, batch: int, length: int):
  """The state :func:`forward_with_state` starts from: Mamba's recurrent cache, or a KV cache for
  ``length`` tokens."""
  if isinstance(model, MambaLM):
    return model.init_cache(batch)
  if isinstance(model, TransformerLM):
    return model.init_cache(batch, length)
  raise ValueError(f"model must be a MambaLM or a TransformerLM; got {type(model).__name__}")


def forward_with_state(model: nnx.Module, tokens: jax.Array, state):
  """Reads ``tokens`` ``(batch, chunk)`` after ``state``: returns ``(logits, state)``."""
  if isinstance(model, MambaLM):
    return model(tokens, state, return_cache=True)
  if isinstance(model, TransformerLM):
    return model(tokens, state)
  raise ValueError(f"model must be a MambaLM or a TransformerLM; got {type(model).__name__}")
