"""Fused selective-state update for decoding: one time step of the selective scan in one kernel.

Semantics are those of :func:`ssmax.scan.selective_state_update` (one step of
:func:`ssmax.selective_scan` from a given state)::

    Δ   = softplus(delta @ delta_proj + delta_bias)      (projection, bias and softplus optional)
    h'  = exp(Δ A) * h + Δ B u
    y   = (C · h' + D u) * SiLU(z)

Plain JAX leaves these to XLA: the Δ projection's matrix product and a few fusions per layer.
Here they are one launch: a program owns one batch element and ``block_channels`` channels, loads
their ``(block_channels, state)`` state tile, the low-rank Δ input and its slice of ``delta_proj``,
and writes y and the new state over the old one (the state is an aliased input-output). In whole
decode steps on an H100 it was not faster than XLA's fusions (the copies and slices around it add
launches; docs/kernel-notes.md), so ``backend="auto"`` does not pick it.

Not differentiable on its own: :func:`selective_state_update` wraps it in a ``custom_vjp`` whose
backward differentiates the plain JAX step. Pallas Triton lowering.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ssmax.pallas.common import MAX_STATE, canonical, dtype_reason, empty_reason
from ssmax.pallas.common import next_pow2 as _next_pow2


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Blocking of the step kernel; ``None`` picks a default.

  Attributes:
    block_channels: channels per program (a power of two), default 64. With several B/C groups
      it is capped so that a program never straddles two groups.
    num_warps: warps per program, default 2. Of six blockings timed on an H100 at the 130M and
      1.4B layer shapes (results/profile_decode/2026-11-23_h100_run1/), 64 x 2 was the fastest
      or within 2 µs of it; 32 channels x 4 warps took 2.3x as long at 1.4B, batch 64.
  """

  block_channels: int | None = None
  num_warps: int | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  batch: int
  channels: int
  state: int
  state_pad: int
  rank: int | None  # low-rank Δ input (delta_proj given), else None
  rank_pad: int
  groups: int
  block: int
  num_warps: int
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  interpret: bool


def _make_plan(state, delta, A, B, D, z, delta_bias, delta_proj, softplus, interpret,
               config: StepConfig) -> _Plan:
  b, d, n = state.shape
  groups = B.shape[1]
  cpg = d // groups
  block = config.block_channels or 64
  if block < 1 or block & (block - 1):
    raise ValueError(f"block_channels must be a power of two; got {block}")
  block = min(block, _next_pow2(cpg))
  if groups > 1:  # a program reads one group's B and C
    block = min(block, cpg & -cpg)
  rank = None if delta_proj is None else delta.shape[1]
  num_warps = config.num_warps or 2
  return _Plan(b, d, n, max(_next_pow2(n), 2), rank, max(_next_pow2(rank or 1), 2), groups, block,
               num_warps, D is not None, z is not None, delta_bias is not None, softplus,
               interpret)


def _kernel(*refs, p: _Plan):
  it = iter(refs)
  h_ref, u_ref, delta_ref, a_ref, b_ref, c_ref = (next(it) for _ in range(6))
  d_ref = next(it) if p.has_d else None
  z_ref = next(it) if p.has_z else None
  bias_ref = next(it) if p.has_bias else None
  w_ref = next(it) if p.rank is not None else None
  y_ref, h_out = next(it), next(it)

  i, j = pl.program_id(0), pl.program_id(1)
  c0 = j * p.block
  cols = pl.ds(c0, p.block)
  cmask = c0 + jnp.arange(p.block) < p.channels
  nidx = pl.ds(0, p.state_pad)
  nmask = jnp.arange(p.state_pad) < p.state
  mask2 = cmask[:, None] & nmask[None, :]
  group = c0 // (p.channels // p.groups)

  def vec(ref, *lead):
    return plgpu.load(ref.at[(*lead, cols)], mask=cmask, other=0.0).astype(jnp.float32)

  u = vec(u_ref, i)
  if p.rank is None:
    dt = vec(delta_ref, i)
  else:  # Δ = delta @ delta_proj for this program's columns, float32
    ridx = pl.ds(0, p.rank_pad)
    rmask = jnp.arange(p.rank_pad) < p.rank
    low = plgpu.load(delta_ref.at[i, ridx], mask=rmask, other=0.0).astype(jnp.float32)
    w = plgpu.load(w_ref.at[ridx, cols], mask=rmask[:, None] & cmask[None, :],
                   other=0.0).astype(jnp.float32)
    dt = jnp.sum(low[:, None] * w, axis=0)
  if p.has_bias:
    dt = dt + vec(bias_ref)
  if p.softplus:
    dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))))

  h = plgpu.load(h_ref.at[i, cols, nidx], mask=mask2, other=0.0)
  a = plgpu.load(a_ref.at[cols, nidx], mask=mask2, other=0.0).astype(jnp.float32)
  bv = plgpu.load(b_ref.at[i, group, nidx], mask=nmask, other=0.0).astype(jnp.float32)
  cv = plgpu.load(c_ref.at[i, group, nidx], mask=nmask, other=0.0).astype(jnp.float32)
  h = jnp.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bv[None, :]
  y = jnp.sum(h * cv[None, :], axis=1)
  if p.has_d:
    y = y + vec(d_ref) * u
  if p.has_z:
    zv = vec(z_ref, i)
    y = y * zv / (1.0 + jnp.exp(-zv))
  plgpu.store(y_ref.at[i, cols], y.astype(y_ref.dtype), mask=cmask)
  plgpu.store(h_out.at[i, cols, nidx], h, mask=mask2)


def unsupported_reason(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_proj=None):
  """Why the step kernel cannot take these (already checked) inputs, or None if it can."""
  if jnp.issubdtype(A.dtype, jnp.complexfloating) or jnp.issubdtype(state.dtype,
                                                                     jnp.complexfloating):
    return "complex A or state is not supported by the step kernel"
  reason = empty_reason(state=(state, ("batch", "channels", "state")))
  if reason is not None:
    return reason
  reason = dtype_reason(**canonical(state=state, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                                    delta_bias=delta_bias, delta_proj=delta_proj))
  if reason is not None:
    return reason
  if A.shape[1] > MAX_STATE:
    return f"state size {A.shape[1]} exceeds the step kernel's maximum of {MAX_STATE}"
  return None


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_proj=None, *, delta_softplus: bool = False,
                           interpret: bool = False, config: StepConfig | None = None):
  """One fused step on checked inputs (see :func:`ssmax.scan.selective_state_update`).

  Args:
    state: ``(batch, channels, state)`` the state before the step.
    u: ``(batch, channels)``.
    delta: ``(batch, channels)``, or ``(batch, rank)`` with ``delta_proj`` ``(rank, channels)``.
    A: ``(channels, state)`` real.
    B, C: ``(batch, groups, state)``; groups divide the channels contiguously.
    D, delta_bias: optional ``(channels,)``; z: optional ``(batch, channels)``.
    delta_softplus: apply softplus to Δ after the bias.
    interpret: run in Pallas's interpreter (CPU).
    config: optional :class:`StepConfig`.

  Returns:
    ``(y, new_state)``: ``y`` ``(batch, channels)`` in ``u.dtype``, ``new_state`` float32.
  """
  reason = unsupported_reason(state, u, delta, A, B, C, D, z, delta_bias, delta_proj)
  if reason is not None:
    raise ValueError(f"the fused step kernel cannot take these inputs: {reason}")
  # NumPy float64 arrays with x64 off become float32, as the plain step makes them.
  state, u, delta, A, B, C, D, z, delta_bias, delta_proj = (
      None if x is None else jnp.asarray(x)
      for x in (state, u, delta, A, B, C, D, z, delta_bias, delta_proj))
  p = _make_plan(state, delta, A, B, D, z, delta_bias, delta_proj, delta_softplus, interpret,
                 config or StepConfig())
  # Parameters go in as they are (bf16 in a bf16 model) and are cast inside: a cast outside would
  # be one more launch per layer and step.
  args = [state.astype(jnp.float32), u, delta, A, B, C, D, z, delta_bias, delta_proj]
  args = [x for x in args if x is not None]
  # Traced with jax_enable_x64 off: the kernel indexes in int32 (program ids), and int64 Python
  # ints or aranges mixed in fail under x64. Arguments and results are 32-bit anyway.
  with jax.enable_x64(False):
    return _call(p, interpret, u.dtype, *args)


def _call(p: _Plan, interpret: bool, y_dtype, *args):
  y, new = pl.pallas_call(
      functools.partial(_kernel, p=p),
      out_shape=[jax.ShapeDtypeStruct((p.batch, p.channels), y_dtype),
                 jax.ShapeDtypeStruct((p.batch, p.channels, p.state), jnp.float32)],
      grid=(p.batch, pl.cdiv(p.channels, p.block)),
      input_output_aliases={0: 1},
      compiler_params=plgpu.CompilerParams(num_warps=p.num_warps, num_stages=1),
      interpret=interpret,
      name="selective_state_update",
  )(*args)
  return y, new
