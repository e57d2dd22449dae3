"""Normalisation layers with the official parameter names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssmax import _checks


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x**2) + eps) * weight`` over the last axis, computed in float32.

  The parameter is ``weight`` ``(dim,)``, initialised to ones, as ``mamba_ssm``'s ``RMSNorm``.
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
    _checks.positive_int("dim", dim)
    if not eps > 0:
      raise ValueError(f"eps must be > 0; got {eps!r}")
    self.dim = dim
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x`` ``(..., dim)`` floating -> same shape and dtype."""
    _checks.floating("x", x)
    _checks.shape("x", x, (None,) * (x.ndim - 1) + (self.dim,), "(..., dim)")
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(dim: int, *, rms_norm: bool, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
  """RMSNorm, or Flax's LayerNorm (parameters ``scale``, ``bias``) when ``rms_norm`` is False."""
  if rms_norm:
    return RMSNorm(dim, eps=eps, param_dtype=param_dtype)
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)
