"""The reference backends in plain JAX: ``lax.scan`` over time and ``lax.associative_scan``.

Both compute, for each batch element, channel d and state index n (Mamba paper, Algorithm 2; the
reference implementation's ``selective_scan_ref``)::

    Δ_t    = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t    = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t      (h_{-1} = initial_state, default 0)
    y_t    = Re(C_t · h_t) + D u_t                   (2 Re(...) when A is complex, as the reference)
    y_t   *= SiLU(z_t)                               (gate optional)

With ``segment_ids`` (packed documents) ``exp(Δ_t A)`` is replaced by 0 wherever a new segment
starts (:func:`ssmax.scan.segments.resets`), so the state restarts from zero there.

In float32 (complex64 for complex A). They return ``y`` in float32 and the last state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssmax.scan import segments
from ssmax.scan.inputs import ScanInputs


def compute_dtypes(x: ScanInputs):
  """The state's dtype (float32 or complex64) and whether A is complex."""
  cplx = jnp.issubdtype(x.A.dtype, jnp.complexfloating)
  return (jnp.complex64 if cplx else jnp.float32), cplx


def delta(x: ScanInputs) -> jax.Array:
  """Δ after bias and softplus, float32 ``(batch, length, channels)``."""
  dt = x.delta.astype(jnp.float32)
  if x.delta_bias is not None:
    dt = dt + x.delta_bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if x.delta_softplus else dt


def expand_groups(m: jax.Array, channels: int) -> jax.Array:
  """``(..., groups, state)`` -> ``(..., channels, state)``, groups split channels contiguously."""
  return jnp.repeat(m, channels // m.shape[-2], axis=-2)


def keep(x: ScanInputs) -> jax.Array | None:
  """``(batch, length)`` float32: 0 where a segment starts (the decay is dropped), else 1; None
  without ``segment_ids``."""
  if x.segment_ids is None:
    return None
  return jnp.where(segments.resets(x.segment_ids), 0.0, 1.0).astype(jnp.float32)


def finish(x: ScanInputs, y: jax.Array, cplx: bool) -> jax.Array:
  """Real part (doubled for complex A, as the reference), D skip and SiLU gate, float32."""
  if cplx:
    y = 2.0 * jnp.real(y)
  u = x.u.astype(jnp.float32)
  if x.D is not None:
    y = y + u * x.D.astype(jnp.float32)
  if x.z is not None:
    y = y * jax.nn.silu(x.z.astype(jnp.float32))
  return y


def sequential(x: ScanInputs):
  """``lax.scan`` over time with the state ``(batch, channels, state)`` in the carry."""
  cdt, cplx = compute_dtypes(x)
  b, _, d = x.u.shape
  A = x.A.astype(cdt)
  dt = delta(x)
  u = x.u.astype(jnp.float32)
  # Zeros typed like one step's update, so that under shard_map the scan carry varies over the
  # same mesh axes as the inputs (zeros_like keeps that type; the step itself is never computed).
  zeros = jnp.zeros_like(jnp.exp(dt[:, 0, :, None] * A) * (dt[:, 0] * u[:, 0])[..., None]
                         * expand_groups(x.B[:, 0].astype(cdt), d))
  h0 = zeros if x.initial_state is None else x.initial_state.astype(cdt) + zeros

  k = keep(x)
  k = jnp.ones(u.shape[:2], jnp.float32) if k is None else k

  def step(h, inputs):
    dt_t, u_t, B_t, C_t, k_t = inputs  # (b, d), (b, d), (b, g, n), (b, g, n), (b,)
    B_t = expand_groups(B_t.astype(cdt), d)
    C_t = expand_groups(C_t.astype(cdt), d)
    decay = jnp.exp(dt_t[..., None] * A)
    if x.segment_ids is not None:
      decay = decay * k_t[:, None, None]
    h = decay * h + (dt_t * u_t)[..., None] * B_t
    return h, jnp.sum(h * C_t, axis=-1)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  last, y = lax.scan(step, h0, (time_major(dt), time_major(u), time_major(x.B), time_major(x.C),
                                time_major(k)))
  return finish(x, jnp.moveaxis(y, 0, 1), cplx), last


def associative(x: ScanInputs):
  """``lax.associative_scan`` over ``(exp(ΔA), ΔBu)`` pairs; materialises ``(b, l, d, n)``."""
  cdt, cplx = compute_dtypes(x)
  b, l, d = x.u.shape
  A = x.A.astype(cdt)
  dt = delta(x)
  u = x.u.astype(jnp.float32)
  decay = jnp.exp(dt[..., None] * A)  # (b, l, d, n)
  if x.segment_ids is not None:
    decay = decay * keep(x)[..., None, None]
  drive = (dt * u)[..., None] * expand_groups(x.B.astype(cdt), d)
  if x.initial_state is not None:
    drive = drive.at[:, 0].add(decay[:, 0] * x.initial_state.astype(cdt))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = lax.associative_scan(combine, (decay, drive), axis=1)
  y = jnp.sum(h * expand_groups(x.C.astype(cdt), d), axis=-1)
  return finish(x, y, cplx), h[:, -1]
