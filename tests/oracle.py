"""Independent float64 references for the selective scan, shared by the scan and kernel tests.

`numpy_scan` is a plain loop over batch and time in NumPy float64. `jax64_scan` is the same loop
written in jax.numpy, meant to run under `jax.enable_x64(True)` so its gradients are float64
gradients of an implementation that shares no code with ssmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _softplus(x):
  return np.logaddexp(0.0, x)


def numpy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None):
  """float64 loop. B, C: (b, l, n) or (b, l, g, n). Returns y (b, l, d), last state (b, d, n)."""
  f = lambda a: None if a is None else np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64)
  u, delta, A, B, C, D, z, delta_bias, h0 = map(f, (u, delta, A, B, C, D, z, delta_bias, initial_state))
  b, l, d = u.shape
  n = A.shape[1]
  cplx = np.iscomplexobj(A)
  if B.ndim == 3:
    B = B[:, :, None]
  if C.ndim == 3:
    C = C[:, :, None]
  dt = delta + (0.0 if delta_bias is None else delta_bias)
  if delta_softplus:
    dt = _softplus(dt)
  y = np.zeros((b, l, d))
  last = np.zeros((b, d, n), np.complex128 if cplx else np.float64)
  for i in range(b):
    h = np.zeros((d, n), last.dtype) if h0 is None else h0[i].astype(last.dtype)
    for t in range(l):
      for c in range(d):
        gb = c // (d // B.shape[2])
        gc = c // (d // C.shape[2])
        h[c] = np.exp(dt[i, t, c] * A[c]) * h[c] + dt[i, t, c] * B[i, t, gb] * u[i, t, c]
        out = np.sum(C[i, t, gc] * h[c])
        y[i, t, c] = 2.0 * out.real if cplx else out
    last[i] = h
  if D is not None:
    y = y + u * D
  if z is not None:
    y = y * z / (1.0 + np.exp(-z))
  return y, last


def jax64_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None, segment_ids=None):
  """The same recurrence in jax.numpy, time loop unrolled in Python; real A only. Use under x64.
  With ``segment_ids`` (batch, length) the state is zeroed before every step whose id differs
  from the step before's."""
  f64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)
  u, delta, A, B, C, D, z, delta_bias, h = map(f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
  b, l, d = u.shape
  if B.ndim == 3:
    B = B[:, :, None]
  if C.ndim == 3:
    C = C[:, :, None]
  Bx = jnp.repeat(B, d // B.shape[2], axis=2)
  Cx = jnp.repeat(C, d // C.shape[2], axis=2)
  dt = delta if delta_bias is None else delta + delta_bias
  if delta_softplus:
    dt = jnp.logaddexp(0.0, dt)
  if h is None:
    h = jnp.zeros((b, d, A.shape[1]), jnp.float64)
  ys = []
  for t in range(l):
    if segment_ids is not None and t > 0:
      h = jnp.where((segment_ids[:, t] != segment_ids[:, t - 1])[:, None, None], 0.0, h)
    h = jnp.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bx[:, t]
    ys.append(jnp.sum(Cx[:, t] * h, axis=-1))
  y = jnp.stack(ys, axis=1)
  if D is not None:
    y = y + u * D
  if z is not None:
    y = y * jax.nn.sigmoid(z) * z
  return y, h


def random_inputs(seed, b=2, l=37, d=5, n=3, groups=None, dtype=np.float32, complex_a=False,
                  with_state=True):
  """Fresh random scan inputs as NumPy arrays (u, delta, z, B, C in `dtype`; the rest float32)."""
  rng = np.random.default_rng(seed)
  shape_bc = (b, l, n) if groups is None else (b, l, groups, n)
  A = -np.exp(rng.normal(size=(d, n)) * 0.5)
  if complex_a:
    A = A + 1j * rng.normal(size=(d, n))
    A = A.astype(np.complex64)
  else:
    A = A.astype(np.float32)
  kw = dict(
      u=rng.normal(size=(b, l, d)).astype(dtype),
      delta=(rng.normal(size=(b, l, d)) * 0.5).astype(dtype),
      A=A,
      B=rng.normal(size=shape_bc).astype(dtype),
      C=rng.normal(size=shape_bc).astype(dtype),
      D=rng.normal(size=(d,)).astype(np.float32),
      z=rng.normal(size=(b, l, d)).astype(dtype),
      delta_bias=(rng.normal(size=(d,)) * 0.5 - 1.0).astype(np.float32),
      delta_softplus=True,
  )
  if complex_a:
    kw["B"] = (kw["B"] + 1j * rng.normal(size=shape_bc)).astype(np.complex64)
    kw["C"] = (kw["C"] + 1j * rng.normal(size=shape_bc)).astype(np.complex64)
  if with_state:
    st = rng.normal(size=(b, d, n))
    kw["initial_state"] = (st + 1j * rng.normal(size=(b, d, n))).astype(np.complex64) if complex_a \
        else st.astype(np.float32)
  return kw


def segment_ids_from_starts(length, *rows) -> np.ndarray:
  """``(len(rows), length)`` int32 segment ids whose documents start at the given positions."""
  ids = np.zeros((len(rows), length), np.int32)
  for b, starts in enumerate(rows):
    for t in starts:
      ids[b, t:] += 1
  return ids


def rel_err(got, want) -> float:
  got = np.asarray(got, np.complex128)
  want = np.asarray(want, np.complex128)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
