"""Sequence parallelism: the scan of a length split into contiguous shards along a mesh axis.

The fused Mosaic GPU kernel does this inside its own pre-pass/combine/main structure. For the
other backends: the recurrence is linear in the state, so shard ``i`` scans its piece from zero and adds the
contribution of the state ``h_in`` entering it afterwards::

    y_t += Re(C_t · exp(A Σ_{s<=t} Δ_s) h_in) * SiLU(z_t)       (t local to the shard)

``h_in`` comes from an exclusive scan over the shards of ``(exp(A ΣΔ), last state)`` pairs
(:func:`ssmax.sharding.pass_state`: one ``all_gather`` of ``(batch, channels, state)`` per shard).

With ``segment_ids`` a boundary stops what crosses shards too: each shard learns the last id of the
shard before it (one ``ppermute``); a shard whose piece holds a boundary (its first position
included) passes on a total decay of 0, so the state it hands on is its own, started at that
boundary, and its correction term is zero from its first boundary on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssmax import sharding
from ssmax.scan import dispatch, reference
from ssmax.scan.inputs import ScanInputs


def check_axis(axis) -> None:
  """A ValueError unless ``axis`` names a mesh axis bound by an enclosing ``shard_map``."""
  if not isinstance(axis, str):
    raise ValueError(f"sequence_axis must be a mesh axis name (str) or None; got {axis!r}")
  try:
    lax.axis_size(axis)
  except NameError:
    raise ValueError(
        f"sequence_axis={axis!r} is not an axis bound here: call selective_scan(..., "
        f"sequence_axis={axis!r}) inside jax.shard_map over a mesh with that axis, or use "
        "ssmax.parallel.selective_scan with global arrays") from None


def scan(backend: dispatch.Backend, x: ScanInputs, axis: str):
  """This shard's ``y`` and the global last state, for inputs sharded along ``axis``.

  The fused Mosaic GPU kernel chains the shards itself (its pre-pass gives each shard's total,
  forward and backward; ``ssmax.pallas``), so a shard costs what the one-device kernel costs on
  its piece. The other backends scan the piece from zero and add the entering state's
  contribution below, rematerialised: the backward pass reruns the shard's scan and keeps only
  the inputs. (That also keeps zero-size intermediates of ``lax.associative_scan`` from becoming
  residuals across ``shard_map``, which XLA's Shardy partitioner in jax 0.11.2 crashes on.)
  """
  if backend is dispatch.Backend.PALLAS and dispatch.kernel_splits_sequences():
    return dispatch.run(backend, x, sequence_axis=axis)
  return jax.checkpoint(lambda x: _scan(backend, x, axis))(x)


def _scan(backend: dispatch.Backend, x: ScanInputs, axis: str):
  cdt, cplx = reference.compute_dtypes(x)
  b, l, d = x.u.shape
  A = x.A.astype(cdt)
  # 1. Scan the local piece from zero state; the backend keeps its own fusion of D and the gate.
  y, h_local = dispatch.run(backend, x.replace(initial_state=None))
  y = y.astype(jnp.float32)
  h_local = h_local.astype(cdt)
  # 2. The state entering this shard, from every shard's total decay exp(A ΣΔ) and last state.
  dt_cum = jnp.cumsum(reference.delta(x), axis=1)  # (b, l, d)
  decay_total = jnp.exp(dt_cum[:, -1, :, None] * A)  # (b, d, n)
  reach = None  # (b, l) float32: 1 before the shard's first boundary, then 0
  if x.segment_ids is not None:
    resets = sharding.segment_starts(x.segment_ids, axis)  # shard 0: initial_state applies
    reach = (jnp.cumsum(resets, axis=1) == 0).astype(jnp.float32)
    decay_total = decay_total * reach[:, -1, None, None]
  h_in, h_last = sharding.pass_state(decay_total, h_local, axis, x.initial_state)
  # 3. Correction y_t += Re(C_t · exp(A cumΔ_t) h_in), gated like y; C grouped over channels.
  g = x.C.shape[2]
  carried = jnp.exp(dt_cum[..., None] * A) * h_in[:, None]
  if reach is not None:
    carried = carried * reach[..., None, None]
  carried = carried.reshape(b, l, g, d // g, -1)
  corr = jnp.sum(carried * x.C.astype(cdt)[:, :, :, None, :], axis=-1).reshape(b, l, d)
  corr = 2.0 * jnp.real(corr) if cplx else corr
  if x.z is not None:
    corr = corr * jax.nn.silu(x.z.astype(jnp.float32))
  return y + corr, h_last
