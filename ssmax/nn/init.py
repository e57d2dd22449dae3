"""Initialisers of the official implementations (PyTorch defaults, Mamba's Δ and A, S4's Δ)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int, scale: float = 1.0):
  """PyTorch's default ``nn.Linear``/``nn.Conv1d`` init: ``U(±scale / sqrt(fan_in))``.

  ``kaiming_uniform_(a=sqrt(5))`` on the weight and the bias rule both reduce to this bound.
  """
  bound = scale / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def log_uniform(key, shape, low: float, high: float) -> jax.Array:
  """Samples ``exp(U(log low, log high))`` in float32."""
  u = jax.random.uniform(key, shape, jnp.float32)
  return jnp.exp(u * (math.log(high) - math.log(low)) + math.log(low))


def inverse_softplus(y: jax.Array) -> jax.Array:
  """``x`` with ``softplus(x) = y`` for ``y > 0``: ``y + log(-expm1(-y))``."""
  return y + jnp.log(-jnp.expm1(-y))


def mamba_dt_bias(dt_min: float, dt_max: float, dt_init_floor: float):
  """Mamba's ``dt_proj.bias``: inverse softplus of Δ ~ log-uniform ``[dt_min, dt_max]``.

  Δ is clamped below at ``dt_init_floor`` before the inverse, so ``softplus(bias)`` starts in
  ``[max(dt_min, floor), dt_max]``.
  """

  def init(key, shape, dtype=jnp.float32):
    dt = jnp.maximum(log_uniform(key, shape, dt_min, dt_max), dt_init_floor)
    return inverse_softplus(dt).astype(dtype)

  return init


def mamba_A_log(channels: int, d_state: int, dtype=jnp.float32) -> jax.Array:
  """``A_log[d, n] = log(n + 1)``: S4D-Real, ``A = -exp(A_log) = -(n + 1)``, in every channel."""
  return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                  (channels, d_state))).astype(dtype)
