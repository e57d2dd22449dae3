"""The language model's recurrent cache: one :class:`MixerState` per layer, fixed size."""

from __future__ import annotations

from typing import NamedTuple

import jax

from ssmax.nn.mixer import MixerState


class MambaCache(NamedTuple):
  """Recurrent state of a :class:`~ssmax.nn.MambaLM` (a pytree).

  Attributes:
    layers: one :class:`MixerState` per block: ``conv`` ``(batch, d_conv, d_inner)`` and ``ssm``
      ``(batch, d_inner, d_state)``. Its size depends on the batch only, never on how many tokens
      have been read.
  """

  layers: tuple[MixerState, ...]


def nbytes(cache: MambaCache) -> int:
  """Total bytes held by ``cache``."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
