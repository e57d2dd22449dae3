"""Fused Pallas kernels: the selective scan, forward and backward (see :mod:`.fused_scan`)."""

# Imported eagerly: the first pallas_call otherwise imports it lazily, which adds a setting to JAX's
# tracing context and makes every compiled function miss its cache once (seen with generate).
import jax.experimental.pallas.fuser  # noqa: F401

from ssmax.pallas.fused_scan import Config, selective_scan, unsupported_reason

__all__ = ["Config", "selective_scan", "unsupported_reason"]
