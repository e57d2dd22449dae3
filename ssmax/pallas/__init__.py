"""Fused Pallas kernels, one file per kernel family: the selective scan, forward and backward
(:mod:`.selective_scan_triton`), and its single-step update for decoding (:mod:`.state_update`).
What they share is in :mod:`.common`."""

# Imported eagerly: the first pallas_call otherwise imports it lazily, which adds a setting to JAX's
# tracing context and makes every compiled function miss its cache once (seen with generate).
import jax.experimental.pallas.fuser  # noqa: F401

from ssmax.pallas.selective_scan_triton import Config, selective_scan, unsupported_reason
from ssmax.pallas.state_update import StepConfig, selective_state_update

# Whether selective_scan may run inside shard_map (its outputs typed for the varying-axis checks).
SUPPORTS_SHARD_MAP = False

__all__ = ["Config", "StepConfig", "SUPPORTS_SHARD_MAP", "selective_scan",
           "selective_state_update", "unsupported_reason"]
