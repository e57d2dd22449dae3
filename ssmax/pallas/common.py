"""What every kernel family of :mod:`ssmax.pallas` shares: supported dtypes and small helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


def canonical(**arrays):
  """``arrays`` (name -> array or None) as shapes and the dtypes JAX will give them: a NumPy
  float64 array is float32 while ``jax_enable_x64`` is off, as every backend casts it."""
  return {k: None if x is None else jax.ShapeDtypeStruct(
      np.shape(x), jax.dtypes.canonicalize_dtype(jnp.result_type(x))) for k, x in arrays.items()}


def empty_reason(**arrays):
  """Why the kernels cannot take a zero-size dimension, or None: ``name=(array, axis names)``,
  with None for an axis that may be empty or is checked elsewhere."""
  for name, (x, axes) in arrays.items():
    for size, axis in zip(np.shape(x), axes):
      if axis is not None and size == 0:
        return (f"{name} has a zero-size {axis} dimension (shape {tuple(np.shape(x))}); the "
                "fused kernels need at least one")
  return None


def scan_unsupported_reason(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            initial_state=None):
  """Why the fused selective scans (both kernel families take the same inputs) cannot take these
  canonical inputs, or None if they can."""
  if jnp.issubdtype(A.dtype, jnp.complexfloating):
    return "complex A is not supported by the fused kernel"
  reason = empty_reason(u=(u, ("batch", "length", "channels")), A=(A, (None, "state")))
  if reason is not None:
    return reason
  reason = dtype_reason(**canonical(u=u, delta=delta, B=B, C=C, z=z, A=A, D=D,
                                    delta_bias=delta_bias, initial_state=initial_state))
  if reason is not None:
    return reason
  if A.shape[1] > MAX_STATE:
    return f"state size {A.shape[1]} exceeds the fused kernel's maximum of {MAX_STATE}"
  return None


def as_arrays(*xs):
  """``xs`` as JAX arrays (None kept): NumPy float64 becomes float32 while x64 is off, as the
  other backends make it."""
  return tuple(None if x is None else jnp.asarray(x) for x in xs)
