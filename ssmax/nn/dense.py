"""Dense layers applied to one row at a time (decoding at batch 1)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# XLA's GPU compiler rewrites a vector-matrix product whose operands hold fewer than 10^7 elements
# into a multiply and a reduction over the matrix's major axis (its DotStrengthReduction pass). At
# batch 1 such products ran several times below memory bandwidth on an H100
# (benchmarks/profile_decode.py); computed as two rows, they stay matrix products (cuBLAS or a
# Triton GEMM).


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """``layer(x)`` for ``x`` ``(..., in_features)``; a single row is computed as two (the second
  zero, then dropped), so that XLA keeps it a matrix product. Same result as ``layer(x)``."""
  if math.prod(x.shape[:-1]) != 1:
    return layer(x)
  row = x.reshape(1, x.shape[-1])
  y = layer(jnp.concatenate([row, jnp.zeros_like(row)], axis=0))[:1]
  return y.reshape(*x.shape[:-1], y.shape[-1])
