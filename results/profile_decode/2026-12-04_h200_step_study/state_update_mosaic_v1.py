"""First version (device call 3; superseded by state_update_mosaic.py). One decoding step of the selective scan in one Mosaic GPU kernel (Hopper and later).

Semantics are those of :func:`ssmax.scan.selective_state_update`::

    Δ   = softplus(delta @ delta_proj + delta_bias)      (projection, bias and softplus optional)
    h'  = exp(Δ A) * h + Δ B u
    y   = (C · h' + D u) * SiLU(z)

In a decode step XLA runs these as four small kernels per layer (Δ's projection, the softplus, the
state update with its reduction over the states, the gate), each a few microseconds of mostly
launch latency. Here they are one. A CTA is one warpgroup: thread ``i`` owns channel ``i`` of a
block of 128 and walks ``rows`` batch rows. Δ's projection is computed for all of the CTA's rows at
once (one pass over the ``(rank, 128)`` slice of ``delta_proj``, each weight row loaded once), then
each row's states are read, advanced and written one state at a time (``state[b, block, j]``: a
strided load per state; the 16 loads of a row cover the same cache lines).

Δ, B and C come in one array ``x`` ``(batch, width)`` at static column offsets: the mixer's
``x_proj`` output ``[Δ_low | B | C]`` goes in as it is, with no slice copies (each would be a launch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssmax.pallas.common import LOG2E

BLOCK = 128  # channels per CTA: one warpgroup, a channel per thread
_F32 = jnp.float32
_VEC = plgpu.Layout.WG_STRIDED((BLOCK,), vec_size=1)


@dataclasses.dataclass(frozen=True)
class _Plan:
  batch: int
  channels: int
  state: int
  rows: int  # batch rows per CTA
  rank: int | None  # low-rank Δ in x[:, :rank] (with delta_proj); None: full Δ (b, channels)
  off_b: int
  off_c: int
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  interpret: bool


def rows_per_cta(batch: int, channels: int, num_sms: int = 132) -> int:
  """Batch rows per CTA: the most (up to 8, sharing one read of ``delta_proj``) that still give
  every SM a CTA; a divisor of ``batch``."""
  blocks = channels // BLOCK
  for r in (8, 4, 2):
    if batch % r == 0 and blocks * (batch // r) >= num_sms:
      return r
  return 1


def _vec(ref):
  return plgpu.load(ref, layout=_VEC, optimized=False).astype(_F32)


def _full(value):
  return plgpu.layout_cast(jnp.full((BLOCK,), value, _F32), _VEC)


def _body(p: _Plan, *refs):
  it = iter(refs)
  x_ref, h_ref, u_ref, a2_ref = (next(it) for _ in range(4))
  dt_ref = next(it) if p.rank is None else None
  w_ref = next(it) if p.rank is not None else None
  z_ref = next(it) if p.has_z else None
  bias_ref = next(it) if p.has_bias else None
  d_ref = next(it) if p.has_d else None
  y_ref, ho_ref = next(it), next(it)

  di, bi = lax.axis_index("d"), lax.axis_index("b")
  cols = pl.ds(di * BLOCK, BLOCK)
  rows = [bi * p.rows + i for i in range(p.rows)]
  scalar = lambda row, k: x_ref[row, k].astype(_F32)

  if p.rank is None:
    dts = [_vec(dt_ref.at[row, cols]) for row in rows]
  else:
    def project(k, acc):  # one weight row, all of the CTA's batch rows
      w = _vec(w_ref.at[k, cols])
      return tuple(a + scalar(row, k) * w for a, row in zip(acc, rows))

    dts = list(lax.fori_loop(0, p.rank, project, tuple(_full(0.0) for _ in rows)))
  bias = _vec(bias_ref.at[cols]) if p.has_bias else None
  dskip = _vec(d_ref.at[cols]) if p.has_d else None
  a2 = [_vec(a2_ref.at[j, cols]) for j in range(p.state)]

  for row, dt in zip(rows, dts):
    if bias is not None:
      dt = dt + bias
    if p.softplus:  # log(1 + e^x) as the reference; x > 20 passes through
      e = jnp.exp(jnp.minimum(dt, 20.0))
      w = 1.0 + e
      dt = jnp.where(dt > 20.0, dt, jnp.where(w == 1.0, e, jnp.log(w) * (e / (w - 1.0))))
    uu = _vec(u_ref.at[row, cols])
    dtu = dt * uu
    y = dskip * uu if dskip is not None else None
    for j in range(p.state):
      h = plgpu.load(h_ref.at[row, cols, j], layout=_VEC, optimized=False)
      h = jnp.exp2(dt * a2[j]) * h + dtu * scalar(row, p.off_b + j)
      ho_ref[row, cols, j] = h
      hc = h * scalar(row, p.off_c + j)
      y = hc if y is None else y + hc
    if p.has_z:
      zz = _vec(z_ref.at[row, cols])
      y = y * (zz / (1.0 + jnp.exp(-zz)))
    y_ref[row, cols] = y.astype(y_ref.dtype)


def step(state, u, x, A, *, off_b: int, off_c: int, rank: int | None = None, delta=None,
         delta_proj=None, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
         rows: int | None = None, interpret: bool = False):
  """The fused step on Δ, B and C packed in ``x``.

  Args:
    state: ``(batch, channels, state)`` float32, the state before the step.
    u: ``(batch, channels)``; z: optional ``(batch, channels)`` gate.
    x: ``(batch, width)``: B at columns ``[off_b, off_b + state)``, C at ``[off_c, off_c +
      state)``, and with ``rank`` the low-rank Δ at ``[0, rank)`` (then ``delta_proj`` ``(rank,
      channels)`` is required and ``delta`` must be None); without ``rank``, ``delta``
      ``(batch, channels)``.
    A: ``(channels, state)`` real.
    D, delta_bias: optional ``(channels,)``.
    rows: batch rows per CTA (a divisor of batch), default :func:`rows_per_cta`.
    interpret: Mosaic GPU's interpreter (CPU).

  Returns:
    ``(y, new_state)``: ``y`` ``(batch, channels)`` in ``u.dtype``, ``new_state`` float32.
  """
  b, d, n = state.shape
  if (rank is None) == (delta is None):
    raise ValueError("give exactly one of rank (low-rank Δ in x) and delta")
  if rank is not None and delta_proj is None:
    raise ValueError("rank needs delta_proj")
  if d % BLOCK:
    raise ValueError(f"channels ({d}) must be a multiple of {BLOCK}")
  rows = rows or rows_per_cta(b, d, _num_sms())
  if b % rows:
    raise ValueError(f"rows ({rows}) must divide the batch ({b})")
  p = _Plan(b, d, n, rows, rank, off_b, off_c, D is not None, z is not None,
            delta_bias is not None, delta_softplus, interpret)
  a2t = jnp.swapaxes(A.astype(_F32) * LOG2E, 0, 1)  # (state, channels): a row per state
  args = [x, state.astype(_F32), u, a2t]
  args += [delta] if rank is None else [delta_proj]
  args += [a for a in (z, delta_bias, D) if a is not None]
  with jax.enable_x64(False):  # block indices are int32
    return _call(p, u.dtype, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(p: _Plan, y_dtype, *args):
  kernel = plgpu.kernel(
      functools.partial(_body, p),
      out_type=(jax.ShapeDtypeStruct((p.batch, p.channels), y_dtype),
                jax.ShapeDtypeStruct((p.batch, p.channels, p.state), _F32)),
      grid=(p.channels // BLOCK, p.batch // p.rows), grid_names=("d", "b"),
      kernel_name="ssm_step", interpret=plgpu.InterpretGPUParams() if p.interpret else None,
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Lane))
  return kernel(*args)


def _num_sms() -> int:
  try:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)
  except Exception:
    return 132
