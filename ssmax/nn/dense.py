"""Dense layers as XLA runs them fastest: one row as two (decoding at batch 1), and an output split
into parts as one product per part (no slice copies)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssmax import _checks

# XLA's GPU compiler rewrites a vector-matrix product whose operands hold fewer than 10^7 elements
# into a multiply and a reduction over the matrix's major axis (its DotStrengthReduction pass). At
# batch 1 such products ran several times below memory bandwidth on an H100
# (benchmarks/profile_decode.py); computed as two rows, they stay matrix products (cuBLAS or a
# Triton GEMM).


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """``layer(x)`` for ``x`` ``(..., in_features)`` -> ``(..., out_features)`` in the layer's
  compute dtype; a single row is computed as two (the second zero, then dropped), so that XLA
  keeps it a matrix product. Same result as ``layer(x)``."""
  return dense_split(layer, x, (layer.out_features,))[0]


def product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` in ``x``'s dtype, a single row computed as two as in :func:`dense`.

  Args:
    x: ``(..., k)`` floating.
    kernel: ``(k, n)`` floating, cast to ``x``'s dtype.

  Returns:
    ``(..., n)`` in ``x``'s dtype.
  """
  _checks.floating("x", x)
  _checks.floating("kernel", kernel)
  _checks.rank("kernel", kernel, 2, "(k, n)")
  k = _checks.shape_of(kernel)[0]
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x must have shape (..., {k}), the rows of kernel; got {x.shape}")
  lead = x.shape[:-1]
  kernel = kernel.astype(x.dtype)
  if math.prod(lead) != 1:
    return jnp.dot(x, kernel)
  return jnp.dot(_two_rows(x), kernel)[:1].reshape(*lead, kernel.shape[-1])


def _two_rows(x):
  """A single row ``(..., k)`` as ``(2, k)``, the second zero."""
  row = x.reshape(1, x.shape[-1])
  return jnp.concatenate([row, jnp.zeros_like(row)], axis=0)


def dense_split(layer: nnx.Linear, x: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """``layer(x)`` split along its last axis into parts of ``sizes``, each computed as its own
  matrix product of a slice of the kernel, so that every part is written contiguous: one product
  sliced afterwards made XLA copy the parts out (36 ms of a 1.4B prefill at batch 64 on an H100).

  Args:
    layer: the ``nnx.Linear`` (its dtype promotion, precision, ``dot_general`` and bias apply).
    x: ``(..., in_features)`` floating input; a single row is computed as two, as in :func:`dense`.
    sizes: positive part widths summing to ``out_features``.

  Returns:
    One ``(..., size)`` array per size, in the layer's compute dtype: the same values as slicing
    ``layer(x)``.
  """
  _checks.floating("x", x)
  if x.ndim < 1 or x.shape[-1] != layer.in_features:
    raise ValueError(f"x must have shape (..., in_features={layer.in_features}); got {x.shape}")
  if (not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)
      or sum(sizes) != layer.out_features):
    raise ValueError(f"sizes must be positive integers summing to out_features="
                     f"{layer.out_features}; got {sizes}")
  lead = x.shape[:-1]
  single = math.prod(lead) == 1
  if single:
    x = _two_rows(x)
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
