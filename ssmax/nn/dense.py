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


def dense_split(layer: nnx.Linear, x: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """``layer(x)`` split along its last axis into parts of ``sizes`` (summing to ``out_features``),
  each computed as its own matrix product of a slice of the kernel, so that every part is written
  contiguous: one product sliced afterwards made XLA copy the parts out (36 ms of a 1.4B prefill
  at batch 64 on an H100). Same values as slicing ``dense(layer, x)``; a single row is computed
  as two, as in :func:`dense`."""
  if sum(sizes) != layer.out_features:
    raise ValueError(f"sizes must sum to out_features={layer.out_features}; got {sizes}")
  lead = x.shape[:-1]
  single = math.prod(lead) == 1
  if single:
    row = x.reshape(1, x.shape[-1])
    x = jnp.concatenate([row, jnp.zeros_like(row)], axis=0)
  kernel = layer.kernel[...]
  bias = layer.bias[...] if layer.bias is not None else None
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  kwargs = {}
  if layer.preferred_element_type is not None:
    kwargs["preferred_element_type"] = layer.preferred_element_type
  parts, start = [], 0
  for size in sizes:
    y = layer.dot_general(x, kernel[:, start:start + size], (((x.ndim - 1,), (0,)), ((), ())),
                          precision=layer.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias[start:start + size], (1,) * (y.ndim - 1) + (-1,))
    if single:
      y = y[:1].reshape(*lead, size)
    parts.append(y)
    start += size
  return tuple(parts)
