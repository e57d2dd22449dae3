"""Fused Pallas kernels: the selective scan, forward and backward (see :mod:`.fused_scan`)."""

from ssmax.pallas.fused_scan import Config, selective_scan, unsupported_reason

__all__ = ["Config", "selective_scan", "unsupported_reason"]
