"""ssmax: structured state space models (S4, Mamba) in JAX, with fused Pallas GPU kernels."""

from ssmax.scan import BACKENDS, selective_scan, selective_state_update

__version__ = "0.1.0"

__all__ = ["BACKENDS", "selective_scan", "selective_state_update", "__version__"]
