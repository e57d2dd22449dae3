"""What every kernel family of :mod:`ssmax.pallas` shares: supported dtypes and small helpers."""

from __future__ import annotations

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
