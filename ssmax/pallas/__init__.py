"""Fused Pallas kernels: the selective scan, forward and backward (:mod:`.fused_scan`), and its
single-step update for decoding (:mod:`.state_update`)."""

# Imported eagerly: the first pallas_call otherwise imports it lazily, which adds a setting to JAX's
# tracing context and makes every compiled function miss its cache once (seen with generate).
import jax.experimental.pallas.fuser  # noqa: F401

from ssmax.pallas.fused_scan import Config, selective_scan, unsupported_reason
from ssmax.pallas.state_update import StepConfig, selective_state_update

__all__ = ["Config", "StepConfig", "selective_scan", "selective_state_update", "unsupported_reason"]
