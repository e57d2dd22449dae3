"""The residual block: ``x + mixer(norm(x))``, the residual stream kept in float32."""

from __future__ import annotations

import jax
from flax import nnx

from ssmax.nn.config import MambaConfig
from ssmax.nn.mixer import MambaMixer, MixerState
from ssmax.nn.norm import make_norm


class Block(nnx.Module):
  """Pre-norm residual block around a :class:`MambaMixer`.

  ``mamba_ssm``'s ``Block`` returns ``(hidden, residual)`` and adds the residual in the next
  block (to fuse add and norm); this is the same computation written as ``x + mixer(norm(x))``
  on the residual stream ``x``, which the model keeps in float32 when
  ``config.residual_in_fp32`` (else in ``config.dtype``). Attributes: ``norm``, ``mixer``.
  """

  def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
    self.norm = make_norm(config.d_model, rms_norm=config.rms_norm, eps=config.norm_epsilon,
                          param_dtype=config.param_dtype, rngs=rngs)
    self.mixer = MambaMixer(config, rngs=rngs)

  def __call__(self, x: jax.Array, state: MixerState | None = None, *,
               return_state: bool = False, segment_ids: jax.Array | None = None):
    """``x`` ``(batch, length, d_model)`` residual stream -> same shape and dtype (and state).

    ``segment_ids`` ``(batch, length)``: packed documents, see :meth:`MambaMixer.__call__`."""
    out = self.mixer(self.norm(x), state, return_state=return_state, segment_ids=segment_ids)
    if return_state:
      h, state = out
      return x + h.astype(x.dtype), state
    return x + out.astype(x.dtype)

  def step(self, state: MixerState, x: jax.Array, *, conv_slot=None):
    """``x`` ``(batch, d_model)`` residual stream of one token -> ``(x', state')``; ``conv_slot``
    as :meth:`MambaMixer.step`'s."""
    h, state = self.mixer.step(state, self.norm(x), conv_slot=conv_slot)
    return x + h.astype(x.dtype), state
