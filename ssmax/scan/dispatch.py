"""Backends of the selective scan: the one enum, and the one place that resolves ``"auto"``."""

from __future__ import annotations

import enum
import math

import jax
# Imported with ssmax, not with the kernels: the first pallas_call imports it otherwise, which adds
# a setting to JAX's tracing context, so that every function jitted before then (a training step
# whose first trace reached the kernel) traced and lowered a second time on its second call.
import jax.experimental.pallas.fuser  # noqa: F401
from jax import lax

from ssmax.scan import reference
from ssmax.scan.inputs import ScanInputs


class Backend(str, enum.Enum):
  """How the scan runs. Plain strings with these values are accepted everywhere."""

  AUTO = "auto"  # the fused kernel on a GPU when it takes the inputs (in shard_map: the Mosaic
  # GPU kernel only), else associative
  SEQUENTIAL = "sequential"  # lax.scan over time
  ASSOCIATIVE = "associative"  # lax.associative_scan, O(log length) depth
  PALLAS = "pallas"  # the fused kernel of ssmax.pallas (interpret mode off the GPU)


BACKENDS = tuple(b.value for b in Backend)


def parse(backend, name: str = "backend") -> Backend:
  """``backend`` as a :class:`Backend`; a ValueError naming ``name`` for anything else."""
  try:
    return Backend(backend)
  except ValueError:
    raise ValueError(f"{name} must be one of {BACKENDS}; got {backend!r}") from None


def kernel_unsupported_reason(x: ScanInputs) -> str | None:
  """Why the fused kernel cannot run the scan of ``x``, or None."""
  from ssmax import pallas  # the kernels layer; imported only when asked about

  reason = pallas.unsupported_reason(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias,
                                     x.initial_state, x.segment_ids)
  if reason is None and _inside_shard_map(x) and jax.default_backend() != "gpu":
    shards = math.prod(lax.axis_size(a) for a in jax.typeof(x.u).mat.varying)
    if shards > 1:  # its simulated GPU memory is not shared safely between devices run at once
      reason = (f"Mosaic GPU's CPU interpreter cannot run the kernel on {shards} devices of a "
                "shard_map at once; on the CPU use one device or another backend")
  return reason


def _inside_shard_map(x: ScanInputs) -> bool:
  return bool(jax.typeof(x.u).mat.varying)


def resolve(backend, x: ScanInputs) -> Backend:
  """A concrete backend for the scan of ``x``: ``"auto"`` resolved, ``"pallas"`` checked."""
  backend = parse(backend)
  if backend in (Backend.SEQUENTIAL, Backend.ASSOCIATIVE):
    return backend
  reason = kernel_unsupported_reason(x)
  if backend is Backend.PALLAS:
    if reason is not None:
      raise ValueError(f'backend="pallas" cannot take these inputs: {reason}; use '
                       'backend="auto" or "associative"')
    return backend
  on_gpu = jax.default_backend() == "gpu"
  # Inside shard_map: the Mosaic GPU kernel was checked on two H100s (tests/parallel/
  # test_parallel_gpu.py); the Triton kernel of older GPUs was not, so "auto" keeps associative.
  if reason is None and on_gpu and (not _inside_shard_map(x) or kernel_splits_sequences()):
    return Backend.PALLAS
  return Backend.ASSOCIATIVE


def resolve_step(backend) -> Backend:
  """The backend of one decoding step: ``"pallas"`` is the fused step kernel, everything else
  (``"auto"`` included) the plain JAX step. In an H100 decode profile the kernel was not faster
  than XLA's fusions (1-2% slower at batch 64, 18-21% at batch 1; docs/results.md)."""
  backend = parse(backend)
  return Backend.PALLAS if backend is Backend.PALLAS else Backend.SEQUENTIAL


def run(backend: Backend, x: ScanInputs, sequence_axis: str | None = None):
  """One concrete backend: ``y`` (float32 or ``u.dtype``) and the last state. ``sequence_axis``
  only with :func:`kernel_splits_sequences`: the fused kernel on one shard of a split length."""
  if backend is Backend.SEQUENTIAL:
    return reference.sequential(x)
  if backend is Backend.ASSOCIATIVE:
    return reference.associative(x)
  from ssmax import pallas

  return pallas.selective_scan(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias,
                               x.initial_state, delta_softplus=x.delta_softplus,
                               segment_ids=x.segment_ids, interpret=jax.default_backend() != "gpu",
                               sequence_axis=sequence_axis)


def kernel_splits_sequences() -> bool:
  """Whether this machine's fused kernel chains shards of a split length itself (Mosaic GPU: yes;
  the Triton kernel of GPUs before Hopper: no)."""
  from ssmax import pallas

  return not pallas._uses_triton()
