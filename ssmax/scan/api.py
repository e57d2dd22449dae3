"""The selective scan (Mamba's S6): one public function, several backends, one set of semantics.

The recurrence is written out in :mod:`ssmax.scan.reference`. Everything inside runs in float32
(complex64 for complex A); ``y`` comes back in ``u.dtype`` and the last state in float32
(complex64).
"""

from __future__ import annotations

from ssmax.scan import dispatch, sequence_parallel
from ssmax.scan.inputs import check_inputs


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, backend="auto",
                   sequence_axis=None, *, segment_ids=None):
  """Selective scan with the semantics of Mamba's ``selective_scan_ref``, batch-major layout.

  Args:
    u: ``(batch, length, channels)`` input, float32/bfloat16/float16; ``length >= 1``.
    delta: ``(batch, length, channels)`` step sizes Δ before bias and softplus.
    A: ``(channels, state)`` continuous-time diagonal transition, float32 or complex64.
    B: ``(batch, length, state)`` or ``(batch, length, groups, state)``; groups divide the channels
      contiguously (channel ``c`` reads group ``c // (channels // groups)``).
    C: like ``B`` (its own group count).
    D: optional ``(channels,)`` skip connection.
    z: optional ``(batch, length, channels)`` gate; ``y *= SiLU(z)``.
    delta_bias: optional ``(channels,)`` added to ``delta`` before the softplus.
    delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
    initial_state: optional ``(batch, channels, state)`` state before the first step.
    return_last_state: also return the state after the last step.
    backend: a :class:`ssmax.scan.Backend` or its value: ``"auto"``, ``"sequential"``,
      ``"associative"``, ``"pallas"``.
    sequence_axis: optional name of a mesh axis along which the length is sharded. Only valid
      inside ``jax.shard_map`` (or another map) binding that axis: every argument with a length
      axis is then this device's contiguous piece of it, in axis order, while ``A``, ``D``,
      ``delta_bias`` and ``initial_state`` are the same on every shard of the axis. The result
      is this device's piece of ``y`` and the last state of the whole sequence, identical on all
      shards. See :func:`ssmax.parallel.selective_scan` for the version taking global arrays.
    segment_ids: optional ``(batch, length)`` integer ids of packed documents (keyword only; under
      ``sequence_axis`` this shard's piece, like ``u``). See "Packed sequences" below.

  Returns:
    ``y`` of shape ``(batch, length, channels)`` in ``u.dtype``; with ``return_last_state`` the pair
    ``(y, last_state)`` with ``last_state`` ``(batch, channels, state)`` in float32 (complex64 when
    ``A`` is complex).

  Raises:
    ValueError: on a bad shape, dtype, group count or backend, naming the argument; on a
      ``sequence_axis`` that is not a string or not bound by an enclosing ``shard_map``; with
      ``segment_ids`` and ``backend="pallas"`` on a GPU before Hopper (its Triton kernel does not
      take them; ``"auto"`` then runs ``"associative"``).

  Packed sequences:
    Several documents may share a row: ``segment_ids[b, t]`` names the document of position
    ``t``, and a new document starts wherever ``segment_ids[b, t] != segment_ids[b, t - 1]`` (only
    changes matter; ids need not be sorted or distinct between rows). There the state restarts
    from zero, as if the document were scanned on its own: in the recurrence ``exp(Δ_t A)`` is
    replaced by 0 at each document's first position. ``initial_state`` is the state before the
    row's *first* document only, and the returned last state is the state at the end of the row,
    that is of its last document. The output of every document then equals
    ``selective_scan`` of that document alone (its gradients too); padding can be packed as one
    more document. Build ids from document lengths with
    :func:`ssmax.scan.segment_ids_from_lengths` or :func:`ssmax.scan.segment_ids_from_cu_seqlens`.
    Under ``sequence_axis`` the boundaries also stop the state passed between shards.
  """
  dispatch.parse(backend)
  x = check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                   segment_ids)
  if sequence_axis is not None:
    sequence_parallel.check_axis(sequence_axis)
  backend = dispatch.resolve(backend, x)
  if sequence_axis is None:
    y, last = dispatch.run(backend, x)
  else:
    y, last = sequence_parallel.scan(backend, x, sequence_axis)
  y = y.astype(x.u.dtype)
  return (y, last) if return_last_state else y
