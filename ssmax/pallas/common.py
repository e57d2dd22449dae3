"""What every kernel family of :mod:`ssmax.pallas` shares: supported dtypes and small helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E); the GPU's fast exponential is base 2
SUPPORTED_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))
MAX_STATE = 256


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def dtype_reason(**arrays) -> str | None:
  """Why one of ``arrays`` (name -> array or None) has a dtype the kernels do not take, or None."""
  for name, x in arrays.items():
    if x is not None and jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
      return f"{name} has dtype {x.dtype}; the fused kernels take float32, bfloat16 or float16"
  return None


def typed_like(out_shape, *inputs):
  """``out_shape`` (a pytree of ``jax.ShapeDtypeStruct``) varying along every mesh axis that one of
  ``inputs`` varies along, and ``inputs`` made to vary along all of them too: inside
  ``jax.shard_map`` a kernel's outputs must say how they vary, and its inputs must agree."""
  varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs if x is not None))
  if not varying:
    return out_shape, inputs
  mat = jax.sharding.ManualAxisType(varying=varying)
  out_shape = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape)

  def vary(x):
    missing = tuple(varying - jax.typeof(x).mat.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return out_shape, tuple(None if x is None else vary(x) for x in inputs)

