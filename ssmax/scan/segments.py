"""Packed sequences: several documents in one row of a batch, told apart by ``segment_ids``.

``segment_ids`` is a ``(batch, length)`` integer array; a new document (segment) starts wherever
the id differs from the one before it, so only changes matter: ``[0, 0, 1, 1, 1, 2]`` and
``[7, 7, 3, 3, 3, 7]`` pack the same three documents. Inside the scan a boundary is a *reset*:
the decay ``exp(Δ_t A)`` at its first position is replaced by 0, so no state crosses it.

The helpers here build ``segment_ids`` from document lengths (``cu_seqlens`` style) and turn them
into resets and into the masks a causal convolution needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssmax import _checks, sharding


def resets(segment_ids: jax.Array) -> jax.Array:
  """Where a new segment starts: ``(batch, length)`` bool, True at ``t >= 1`` when
  ``segment_ids[:, t] != segment_ids[:, t - 1]`` (position 0 never: a carried state belongs to the
  row's first document). :func:`ssmax.sharding.segment_starts` on one device.

  Args:
    segment_ids: ``(batch, length)`` integer ids, ``length >= 1``.
  """
  return sharding.segment_starts(segment_ids)


def window_mask(segment_ids: jax.Array, width: int, left_ids: jax.Array | None = None) -> jax.Array:
  """Which inputs of a width-``width`` causal window lie in the output's segment.

  Args:
    segment_ids: ``(batch, length)`` integer ids.
    width: the window (a causal convolution's kernel width).
    left_ids: optional ``(batch, width - 1)`` ids of the ``width - 1`` positions before the first
      (the left context); by default they continue the first segment (a carried state belongs to
      the row's first document).

  Returns:
    ``(batch, length, width)`` bool: ``mask[b, t, j]`` is True when the input at position
    ``t - (width - 1 - j)`` (``j = width - 1`` is ``t`` itself) belongs to the segment of ``t``,
    with no boundary between them.
  """
  b, l = segment_ids.shape
  before = left_ids
  if before is None:
    before = jnp.broadcast_to(segment_ids[:, :1], (b, width - 1))
  ids = jnp.concatenate([before.astype(segment_ids.dtype), segment_ids], axis=1)
  index = jnp.cumsum(resets(ids), axis=1)  # the segment number of every position, from 0
  windows = jnp.stack([index[:, j:j + l] for j in range(width)], axis=-1)  # (b, l, width)
  return windows == index[:, width - 1:, None]


def left_ids(segment_ids: jax.Array, width: int, axis_name: str | None = None) -> jax.Array:
  """``(batch, width)`` ids of the ``width`` positions before this piece: the previous shard's
  last ones under ``axis_name`` (but on the first shard), else a continuation of the first
  segment (a carried state belongs to the row's first document)."""
  own = jnp.broadcast_to(segment_ids[:, :1], (segment_ids.shape[0], width))
  if axis_name is None or width == 0:
    return own
  halo = sharding.sequence_halo(segment_ids[..., None], width, axis_name)[..., 0]
  return jnp.where(lax.axis_index(axis_name) == 0, own, halo)


def segment_ids_from_lengths(lengths, length: int) -> jax.Array:
  """``segment_ids`` for documents of the given lengths packed one after another in each row.

  Args:
    lengths: ``(batch, documents)`` (or ``(documents,)`` for one row) non-negative integer
      document lengths, in order; zeros are allowed (padding in a ragged list of documents).
    length: the row length, ``>= lengths.sum(-1)``.

  Returns:
    ``(batch, length)`` int32: position ``t`` gets the index of the document holding it; the
    positions after the last document form one more segment (padding), numbered ``documents``.
    Works under ``jax.jit`` with ``length`` static.

  Raises:
    ValueError: on a bad rank, dtype or ``length``; on concrete lengths that are negative or add
      up to more than ``length``.
  """
  _checks.rank("lengths", lengths, (1, 2), "(batch, documents) or (documents,)")
  if not jnp.issubdtype(_checks.dtype_of(lengths), jnp.integer):
    raise ValueError(f"lengths must have an integer dtype; got {_checks.dtype_of(lengths)}")
  length = _checks.positive_int("length", length)
  if not isinstance(lengths, jax.core.Tracer):
    concrete = np.asarray(lengths)
    if concrete.size and (concrete.min() < 0 or concrete.sum(-1).max() > length):
      raise ValueError(f"lengths must be >= 0 and add up to at most length={length} per row; "
                       f"got {concrete.tolist()}")
  lengths = jnp.asarray(lengths, jnp.int32)
  lengths = lengths[None] if lengths.ndim == 1 else lengths
  ends = jnp.cumsum(lengths, axis=-1)  # (b, docs): exclusive end of each document
  t = jnp.arange(length, dtype=jnp.int32)
  ids = jnp.sum(t[None, :, None] >= ends[:, None, :], axis=-1).astype(jnp.int32)
  return ids


def segment_ids_from_cu_seqlens(cu_seqlens, length: int | None = None) -> jax.Array:
  """``segment_ids`` ``(1, length)`` for a flat batch given by cumulative lengths.

  Args:
    cu_seqlens: ``(documents + 1,)`` integers, ``0 = c_0 <= c_1 <= ... <= c_n``: document ``i``
      occupies positions ``[c_i, c_{i+1})``, as in FlashAttention's varlen API.
    length: the row length; default ``c_n`` (then ``cu_seqlens`` must be concrete).

  Returns:
    ``(1, length)`` int32 for one packed row (the batch axis of the scan).
  """
  _checks.rank("cu_seqlens", cu_seqlens, 1, "(documents + 1,)")
  if not isinstance(cu_seqlens, jax.core.Tracer):
    c = np.asarray(cu_seqlens)
    if c.size < 1 or c[0] != 0 or np.any(np.diff(c) < 0):
      raise ValueError(f"cu_seqlens must start at 0 and not decrease; got {c.tolist()}")
    if length is None:
      length = int(c[-1])
  elif length is None:
    raise ValueError("length must be given when cu_seqlens is traced")
  return segment_ids_from_lengths(jnp.diff(jnp.asarray(cu_seqlens, jnp.int32)), length)
