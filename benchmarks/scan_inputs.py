"""The selective scan's benchmark shapes and Mamba-like inputs, shared by ``bench_scan`` and the
kernel's GPU check (``tests/kernels/test_scan_gpu.py``); no flags, so a test can import it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SHAPES = {  # (batch, length, d_inner, d_state)
    "130m-train": (8, 2048, 1536, 16),
    "1.4b-train": (4, 2048, 4096, 16),
    "long-32k": (1, 32768, 2048, 16),
    "tiny": (2, 64, 8, 4),  # CPU smoke runs
}
# Official CUDA kernel on an H100 (../shared/anchors/official_cuda_h100.json), ms (fwd, fwd+bwd).
OFFICIAL_MS = {"130m-train": (0.452, 2.279), "1.4b-train": (0.595, 3.041),
               "long-32k": (1.506, 7.261)}
# The scan's array arguments, in ssmax.selective_scan's order (the differentiable ones).
ARRAYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(key, b, l, d, n, dtype, groups=None, with_state=False) -> dict:
  """Keyword arguments of ``ssmax.selective_scan`` as in a Mamba layer: Δ around softplus^-1 of
  [1e-3, 1e-1], S4D-real A, z gate, D skip, softplus on. B and C are ``(b, l, n)``, or ``(b, l,
  groups, n)`` with ``groups``; ``with_state`` adds an initial state."""
  ks = jax.random.split(key, 9)
  bc = (b, l, n) if groups is None else (b, l, groups, n)
  dt = jnp.exp(jax.random.uniform(ks[0], (d,)) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
  kw = dict(
      u=jax.random.normal(ks[1], (b, l, d), dtype),
      delta=(0.5 * jax.random.normal(ks[2], (b, l, d))).astype(dtype),
      A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
      B=jax.random.normal(ks[3], bc, dtype),
      C=jax.random.normal(ks[4], bc, dtype),
      D=jnp.ones((d,), jnp.float32),
      z=jax.random.normal(ks[5], (b, l, d), dtype),
      delta_bias=(dt + jnp.log(-jnp.expm1(-dt))).astype(jnp.float32),
      delta_softplus=True,
  )
  if with_state:
    kw["initial_state"] = jax.random.normal(ks[6], (b, d, n), jnp.float32)
  return kw


def packed_segment_ids(key, b: int, l: int, mean_length: float = 256.0) -> jax.Array:
  """``(b, l)`` int32 segment ids of documents with long-tailed lengths (log-normal, sigma 1,
  median ``mean_length / e^0.5``, at least 1 token) packed one after another in each row, as a
  packed training batch of mixed documents would be."""
  mu = math.log(mean_length) - 0.5
  lengths = jnp.maximum(1, jnp.exp(mu + jax.random.normal(key, (b, l))).astype(jnp.int32))
  starts = jnp.cumsum(lengths, axis=1) - lengths  # (b, documents), past l for the unused ones
  t = jnp.arange(l)
  return jnp.sum(starts[:, None, :] <= t[None, :, None], axis=-1).astype(jnp.int32) - 1


def split(kw: dict) -> tuple[list[str], list, dict]:
  """``(names, arrays, static)``: the array arguments present, in order, and the rest
  (``segment_ids`` among the rest: not differentiable, it is closed over)."""
  names = [k for k in ARRAYS if k in kw]
  return names, [kw[k] for k in names], {k: v for k, v in kw.items() if k not in names}
