"""Collectives along a sequence-sharded mesh axis, for code running inside ``jax.shard_map``.

A sequence split into contiguous pieces along a mesh axis needs, at each boundary, what a layer
carries across it: a linear recurrence its state (:func:`pass_state`), a causal convolution its
last inputs (:func:`sequence_halo`), an FFT convolution the whole sequence (:func:`gather_sequence`
and :func:`local_piece`). The selective scan (``sequence_axis=``) and the nn layers both use these;
:mod:`ssmax.parallel` builds meshes and global-array entry points on top.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssmax import _checks

# ----------------------------------------------------------------------------------------------
# Collectives.


def sequence_halo(x: jax.Array, width: int, axis_name: str,
                  first: jax.Array | None = None) -> jax.Array:
  """The previous shard's last ``width`` steps: the left context of a causal convolution.

  Args:
    x: ``(batch, length, channels)`` this shard's piece, ``length >= width``.
    width: number of steps to pass on (``d_conv - 1`` for a width-``d_conv`` convolution).
    axis_name: the mesh axis the length is sharded over (bound by an enclosing ``shard_map``).
    first: optional ``(batch, width, channels)`` left context of the first shard (e.g. a carried
      convolution state); zeros if None.

  Returns:
    ``(batch, width, channels)`` in ``x.dtype``: shard ``i > 0`` gets shard ``i - 1``'s last
    ``width`` steps, shard 0 gets ``first``.

  Raises:
    ValueError: on a bad rank or ``width``, a local length below ``width`` or an unbound axis.
  """
  _checks.rank("x", x, 3, "(batch, length, channels)")
  width = _checks.positive_int("width", width)
  b, l, c = x.shape
  if l < width:
    raise ValueError(f"x must hold at least width={width} steps per shard so the halo comes from "
                     f"one neighbour; got shape {x.shape} (use fewer sequence shards)")
  if first is not None:
    _checks.shape("first", first, (b, width, c), "(batch, width, channels)")
  n = axis_size(axis_name)
  tail = x[:, l - width:]
  # A full cycle (shard 0 gets the last shard's tail, replaced below): vmap with an axis name
  # takes only permutations, and the tests emulate shards with it.
  received = lax.ppermute(tail, axis_name, [(i, (i + 1) % n) for i in range(n)])
  first = jnp.zeros_like(tail) if first is None else first.astype(x.dtype)
  return jnp.where(lax.axis_index(axis_name) == 0, first, received)


def gather_sequence(x: jax.Array, axis_name: str) -> jax.Array:
  """All shards' pieces concatenated along axis 1: ``(batch, length, ...)`` ->
  ``(batch, length * shards, ...)``, for layers that need the whole sequence (FFT convolution)."""
  min_rank("x", x, 2, "(batch, length, ...)")
  axis_size(axis_name)
  return lax.all_gather(x, axis_name, axis=1, tiled=True)


def local_piece(x: jax.Array, axis_name: str) -> jax.Array:
  """This shard's piece along axis 1 of a whole-sequence ``x``: the inverse of
  :func:`gather_sequence`. ``(batch, length * shards, ...)`` -> ``(batch, length, ...)``."""
  min_rank("x", x, 2, "(batch, length, ...)")
  n = axis_size(axis_name)
  if x.shape[1] % n:
    raise ValueError(f"x's length {x.shape[1]} must be divisible by the {n} shards of "
                     f"{axis_name!r}; got shape {x.shape}")
  piece = x.shape[1] // n
  return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * piece, piece, axis=1)


def pass_state(decay: jax.Array, last: jax.Array, axis_name: str,
               initial_state: jax.Array | None = None, *, reverse: bool = False):
  """State passing for a diagonal linear recurrence whose length is split over ``axis_name``.

  Each shard ran its piece from zero state. With ``h_out = decay * h_in + last`` per shard
  (elementwise; ``decay`` the product of the shard's transitions, e.g. ``exp(A ΣΔ)`` or
  ``Ab ** length``), returns the state entering this shard and the state after the whole sequence.
  With ``reverse`` the recurrence runs from the last shard to the first (an adjoint: a cotangent
  enters each shard at its end and leaves at its start), ``initial_state`` entering the last.

  Args:
    decay: ``(batch, channels, state)`` (any shape) this shard's total transition.
    last: like ``decay``: this shard's final state, started from zero.
    axis_name: the mesh axis the length is split over (bound by an enclosing ``shard_map``).
    initial_state: optional state before the first shard (the last with ``reverse``; zeros if
      None), same on all shards.
    reverse: chain the shards last to first.

  Returns:
    ``(entering, final)`` in ``last.dtype``; ``final`` is the same on every shard of the axis.

  Raises:
    ValueError: on mismatched shapes or an unbound axis.
  """
  _checks.shape("last", last, _checks.shape_of(decay), "like decay")
  if initial_state is not None:
    _checks.shape("initial_state", initial_state, _checks.shape_of(decay), "like decay")
  axis_size(axis_name)
  decays = lax.all_gather(decay, axis_name)  # (shards, ...)
  lasts = lax.all_gather(last, axis_name)
  zeros = jnp.zeros_like(last)  # typed as varying along the axis, like a scan's carry
  h0 = zeros if initial_state is None else initial_state.astype(last.dtype) + zeros

  def step(h_in, shard):
    decay, h_shard = shard
    return decay * h_in + h_shard, h_in

  h_last, entering = lax.scan(step, h0, (decays, lasts), reverse=reverse, unroll=True)
  index = lax.axis_index(axis_name)
  # Every shard computed the same h_last; selecting shard 0's through psum (adding exact zeros)
  # makes it a value that is replicated along the axis as far as shard_map's checks can see.
  h_last = lax.psum(jnp.where(index == 0, h_last, jnp.zeros_like(h_last)), axis_name)
  return entering[index], h_last


def segment_starts(segment_ids: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Where a new packed document starts in this piece of a sequence: ``(batch, length)`` bool,
  True where the id differs from the one before it.

  Position 0 counts under ``axis_name`` when its id differs from the previous shard's last (one
  ``ppermute``), but never on the first shard (where a carried ``initial_state`` applies), nor
  without ``axis_name``.

  Args:
    segment_ids: ``(batch, length)`` integer ids of this shard's piece, ``length >= 1``.
    axis_name: optional mesh axis the length is split over (bound by an enclosing
      ``shard_map``).

  Raises:
    ValueError: on a bad rank or dtype, an empty piece or an unbound axis.
  """
  _checks.rank("segment_ids", segment_ids, 2, "(batch, length)")
  if not jnp.issubdtype(_checks.dtype_of(segment_ids, "segment_ids"), jnp.integer):
    raise ValueError(f"segment_ids must be integers; got {_checks.dtype_of(segment_ids)}")
  if segment_ids.shape[1] < 1:
    raise ValueError(f"segment_ids must hold at least one position; got {segment_ids.shape}")
  first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
  if axis_name is not None:
    before = sequence_halo(segment_ids[..., None], 1, axis_name)[:, 0, 0]
    first = (segment_ids[:, :1] != before[:, None]) & (lax.axis_index(axis_name) > 0)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def last_shard(x, axis_name: str):
  """The value ``x`` has on the last shard of ``axis_name``, on every shard (a pytree works).

  For state that leaves the end of a sequence (a convolution's last inputs): it is exact (the
  other shards add zeros) and replicated along the axis as ``shard_map`` expects of an output
  whose spec does not name the axis.
  """
  n = axis_size(axis_name)
  is_last = lax.axis_index(axis_name) == n - 1
  return jax.tree.map(lambda a: lax.psum(jnp.where(is_last, a, jnp.zeros_like(a)), axis_name), x)


# ----------------------------------------------------------------------------------------------
# Checks.


def axis_size(axis_name) -> int:
  """The size of a bound mesh axis; a ValueError naming it when no enclosing map binds it."""
  try:
    return lax.axis_size(axis_name)
  except NameError:
    raise ValueError(f"axis_name={axis_name!r} is not bound here: call this inside jax.shard_map "
                     "over a mesh with that axis") from None


def min_rank(name: str, x, rank: int, what: str) -> None:
  if np.ndim(x) < rank:
    raise ValueError(f"{name} must have rank >= {rank} {what}; got shape {_checks.shape_of(x)}")
