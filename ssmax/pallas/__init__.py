"""Fused Pallas kernels, one file per kernel family, each with its wrapper and ``custom_vjp``:

* :mod:`.selective_scan_mosaic`: the selective scan, forward and backward, in Pallas Mosaic GPU
  (Hopper and later). This is what ``backend="pallas"`` runs on those GPUs, and on the CPU in
  Mosaic GPU's interpreter (the tests).
* :mod:`.selective_scan_triton`: the same scan in the Pallas Triton lowering, for GPUs before
  Hopper, on which Mosaic GPU does not run (the Triton lowering is deprecated since JAX 0.11).
* :mod:`.state_update`: one decoding step (Triton lowering).

What they share is in :mod:`.common`.
"""

from __future__ import annotations

import jax

from ssmax.pallas import selective_scan_triton
from ssmax.pallas.selective_scan_mosaic import Config
from ssmax.pallas.selective_scan_mosaic import selective_scan as _mosaic_scan
from ssmax.pallas.selective_scan_mosaic import unsupported_reason as _mosaic_reason
from ssmax.pallas.state_update import StepConfig, selective_state_update

def _uses_triton(config=None) -> bool:
  """The Triton kernel on a GPU older than Hopper, or when given its Config; else Mosaic GPU."""
  if isinstance(config, selective_scan_triton.Config):
    return True
  if config is not None or jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "9.0")
  return float(capability) < 9.0


def unsupported_reason(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                       segment_ids=None):
  """Why the fused kernel of this machine cannot take these canonical inputs, or None."""
  triton = _uses_triton()
  if segment_ids is not None and triton:
    return "segment_ids are not supported by the Triton kernel (GPUs before Hopper)"
  reason = selective_scan_triton.unsupported_reason if triton else _mosaic_reason
  return reason(u, delta, A, B, C, D, z, delta_bias, initial_state)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, *,
                   delta_softplus: bool = False, segment_ids=None, interpret: bool = False,
                   config=None, sequence_axis=None):
  """The fused selective scan on canonical inputs (B and C ``(batch, length, groups, state)``).

  Shapes, dtypes, ``segment_ids`` and the result are those of
  :func:`.selective_scan_mosaic.selective_scan`. ``config`` is a :class:`Config` (Mosaic GPU) or
  a ``selective_scan_triton.Config`` (which picks the Triton kernel, without ``segment_ids``);
  None picks the kernel for this machine and its default blocking. ``sequence_axis`` (Mosaic GPU
  only): the length is split over that mesh axis of an enclosing ``shard_map``.
  """
  if _uses_triton(config):
    if segment_ids is not None:
      raise ValueError("segment_ids are not supported by the Triton kernel (GPUs before Hopper)")
    if sequence_axis is not None:
      raise ValueError("sequence_axis is not supported by the Triton kernel (GPUs before Hopper)")
    return selective_scan_triton.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus=delta_softplus,
        interpret=interpret, config=config)
  return _mosaic_scan(u, delta, A, B, C, D, z, delta_bias, initial_state,
                      delta_softplus=delta_softplus, segment_ids=segment_ids,
                      interpret=interpret, config=config, sequence_axis=sequence_axis)


__all__ = ["Config", "StepConfig", "selective_scan",
           "selective_state_update", "unsupported_reason"]
