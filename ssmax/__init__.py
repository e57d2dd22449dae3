"""ssmax: structured state space models (S4, Mamba) in JAX, with fused Pallas GPU kernels.

Layers, each importing only those above it: maths (:mod:`ssmax.hippo`, :mod:`ssmax.discretize`,
:mod:`ssmax.lti`), collectives (:mod:`ssmax.sharding`), kernels (:mod:`ssmax.pallas`), the scan
(:mod:`ssmax.scan`), files (:mod:`ssmax.io`), modules (:mod:`ssmax.nn`), many devices
(:mod:`ssmax.parallel`).
"""

import importlib

from ssmax.scan import BACKENDS, Backend, selective_scan, selective_state_update

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Backend", "selective_scan", "selective_state_update", "__version__"]

# Submodules reachable as attributes without importing them eagerly (flax, orbax).
_LAZY = {"checkpoint": "ssmax.io.checkpoint", "discretize": "ssmax.discretize",
         "hippo": "ssmax.hippo", "io": "ssmax.io", "lti": "ssmax.lti", "nn": "ssmax.nn",
         "pallas": "ssmax.pallas", "parallel": "ssmax.parallel", "sharding": "ssmax.sharding"}


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(_LAZY[name])
  raise AttributeError(f"module 'ssmax' has no attribute {name!r}")
