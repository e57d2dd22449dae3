"""Fused selective scan (Mamba's S6) for GPUs in Pallas, forward and backward.

Semantics are those of :func:`ssmax.scan.selective_scan` (``_sequential`` there is the reference).

Blocking. A program owns one batch element, ``block_channels`` channels that share one B group and
one C group, and one *split* of the sequence: ``chunks_per_split`` chunks of ``chunk`` time steps.
Channels are the last axis of every array so that each row of u, Δ, z and y is one coalesced
access. Inside a chunk the time steps are unrolled in Python, so their independent loads are issued
ahead of the recurrence. The state is held in float32 registers in one of two layouts:

* rows (state sizes up to ``ROWS_MAX_STATE``, the default there): a Python list with one
  ``(block_channels,)`` vector per state. With 32 channels and one warp a thread owns one channel
  and all of its states, so every op is elementwise and the sums over states (C·h, dΔ, du) stay in
  the thread: the generated code has no layout conversions and no shuffles in the forward. B and C
  are read as warp-uniform scalars, two 16-bit states per 32-bit load. The backward's sums over
  channels (dB and dC of a step, 2·n values) take one butterfly reduce-scatter of warp shuffles
  (:func:`_reduce_scatter`), 2·n - 1 shuffles instead of 2·n·5.
* tile (larger states): one ``(padded state, block_channels)`` array laid out by Triton.

Forward (``_forward``):
  1. if the sequence has several splits, ``_fwd_local_kernel`` runs each split from a zero state and
     returns its end state and its sum of Δ; a short ``lax.scan`` over splits gives every split its
     entering state (exp(A·ΣΔ) is the split's total decay);
  2. ``_fwd_kernel`` walks each split from its entering state, writes y, and saves the state entering
     each chunk: ``(batch, chunks, state, channels)`` float32, the only residual besides the inputs.

Backward (``_backward``), the same two steps in reverse time:
  1. ``_bwd_local_kernel`` runs the adjoint recurrence g_{t-1} = exp(Δ_t A) (g_t + C_t dout_t) over
     each split from zero (it needs no states); a reverse ``lax.scan`` over splits gives each split
     the gradient of the state at its end, the last one being the cotangent of ``last_state``;
  2. ``_bwd_kernel`` walks the chunks of its split backwards: it recomputes the chunk's states from
     the saved one (kept in registers, one state per unrolled step), then walks back over them.
     Gradients of B and C are reduced over the program's channels inside the kernel and over
     channel blocks by XLA afterwards, and parameter gradients are summed per program and then by
     XLA: every sum has a fixed order, so the backward is deterministic (no atomics).

The kernels use the Pallas Triton lowering (``pl.pallas_call`` with ``pallas.triton`` compiler
parameters): on JAX 0.11 it lowers dynamic ``pl.ds`` indexing inside ``fori_loop``, masked loads and
reductions. A forward+backward compiles in 5 s (tile) to 30 s (rows, whose unrolled lists make long
programs) on an H100, XLA included. Triton needs power-of-two array shapes, so channels and states
are padded up and masked. With ``interpret=True`` the same kernels run in Pallas's interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ssmax.pallas.common import LOG2E as _LOG2E, as_arrays, scan_unsupported_reason
from ssmax.pallas.common import next_pow2 as _next_pow2


@dataclasses.dataclass(frozen=True)
class Config:
  """Tuning knobs; ``None`` picks a default from the shapes.

  Attributes:
    block_channels: channels per forward program (a power of two).
    chunk: time steps per chunk, unrolled; the forward saves the state entering each chunk and the
      backward keeps a chunk's recomputed states in registers.
    splits: number of programs along time (sequence parallelism); default from
      ``target_programs``.
    num_warps: warps per forward program.
    bwd_block_channels, bwd_num_warps: the same for the backward programs.
    bwd_reload: reload a step's inputs in the backward's reverse walk instead of keeping them live
      (fewer register spills; faster on an H100, see docs/kernel-notes.md).
    target_programs: programs per launch that the default number of splits aims at.
    layout: how a program holds its state. ``"rows"``: one list entry per state, each a vector
      over the program's channels, so a thread owns one channel's whole state and reductions over
      the state axis stay in registers; ``"tile"``: one ``(state, channels)`` array laid out by
      Triton. ``"auto"``: rows for state sizes up to ``ROWS_MAX_STATE``, tile above.
    pack_bc: in the rows layout, read 16-bit B and C two states per 32-bit load (an even state
      size): every thread reads all of a step's B and C, so this halves the loads per step.
  """

  block_channels: int | None = None
  chunk: int | None = None
  splits: int | None = None
  num_warps: int | None = None
  bwd_block_channels: int | None = None
  bwd_num_warps: int | None = None
  bwd_reload: bool = True
  target_programs: int = 2048
  layout: str = "auto"
  pack_bc: bool = True


ROWS_MAX_STATE = 32


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static blocking of one call (hashable: it parameterises the kernels)."""

  batch: int
  length: int
  channels: int
  state: int
  groups_b: int
  groups_c: int
  groups: int  # fine groups: lcm(groups_b, groups_c); a program never straddles one
  group_channels: int  # channels per fine group
  block: int  # channels per program
  sub_blocks: int  # programs per fine group
  state_pad: int
  chunk: int
  chunks: int
  chunks_per_split: int
  splits: int
  num_warps: int
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  interpret: bool
  reload: bool = False
  rows: bool = False
  packed: str | None = None  # "bfloat16"/"float16": B and C arrive as uint32 pairs of states

  @property
  def channel_programs(self) -> int:
    return self.groups * self.sub_blocks

  @property
  def ragged(self) -> bool:
    return self.length % self.chunk != 0


def _make_plan(u, B, C, A, D, z, delta_bias, softplus, interpret, config: Config,
               backward: bool = False, primal_only: bool = False) -> _Plan:
  b, l, d = u.shape
  n = A.shape[1]
  gb, gc = B.shape[2], C.shape[2]
  g = math.lcm(gb, gc)
  cpg = d // g
  np_ = max(_next_pow2(n), 2)
  # Registers bound the tile: the backward keeps chunk + 1 state tiles alive.
  elems = 2048 if not backward else 1024
  block = config.bwd_block_channels if backward else config.block_channels
  if block is None:
    block = max(1, min(32, elems // np_))
  block = min(_next_pow2(block), max(_next_pow2(cpg), 1))
  num_warps = config.bwd_num_warps if backward else config.num_warps
  if config.layout not in ("auto", "rows", "tile"):
    raise ValueError(f"config.layout must be 'auto', 'rows' or 'tile'; got {config.layout!r}")
  rows = config.layout == "rows" or (config.layout == "auto" and n <= ROWS_MAX_STATE)
  if rows and backward and block > 32:  # its dB/dC butterfly shuffles within one warp
    if config.layout == "rows":
      raise ValueError(f"config.layout='rows' needs bwd_block_channels <= 32; got {block}")
    rows = False
  if num_warps is None:  # rows: a thread per channel
    num_warps = max(1, block // 32) if rows else max(1, min(4, block * np_ // 512))
  sub_blocks = -(-cpg // block)
  # Short chunks keep the backward's recomputed states in registers (chunk 8 spills). A forward
  # that saves nothing for a backward runs longer chunks when batch x channel blocks alone give
  # enough programs (H100: 0.96 vs 1.06 ms at 130m-train; the reverse at long-32k).
  chunk = config.chunk or (8 if primal_only and b * g * sub_blocks >= 256 else 4)
  chunks = -(-l // chunk)
  if config.splits is not None:
    splits = config.splits
  else:
    splits = max(1, config.target_programs // (b * g * sub_blocks))
  splits = max(1, min(splits, chunks))
  cps = -(-chunks // splits)
  splits = -(-chunks // cps)
  packed = None
  if rows and config.pack_bc and n % 2 == 0 and B.dtype == C.dtype and B.dtype.itemsize == 2:
    packed = jnp.dtype(B.dtype).name
  return _Plan(b, l, d, n, gb, gc, g, cpg, block, sub_blocks, np_, chunk, chunks, cps, splits,
               num_warps, D is not None, z is not None, delta_bias is not None, softplus,
               interpret, reload=backward and config.bwd_reload, rows=rows, packed=packed)


# ----------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _exp2(x, interpret):
  if interpret:
    return jnp.exp2(x)
  [y] = plgpu.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def _shfl_xor(x, offset, interpret):
  """Element ``e`` of the result is element ``e ^ offset`` of ``x`` (``offset`` < 32).

  On the GPU this is one warp shuffle: in the rows layout a 1-D vector of ``block`` <= 32
  channels puts element ``e`` in lane ``e`` (lane ``e % block`` when the warp repeats it)."""
  if interpret:
    n = x.shape[0]
    return x.reshape(n // (2 * offset), 2, offset)[:, ::-1].reshape(n)
  [y] = plgpu.elementwise_inline_asm(
      f"shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def _reduce_scatter(values, lanes, interpret):
  """Sums each of ``m`` (a power of two) ``(lanes,)`` vectors over its elements, butterfly style.

  Each halving step trades half of the vectors with the partner ``offset`` lanes away, so the m
  sums take m - 1 shuffles in all instead of m·log2(lanes). Returns ``max(m // lanes, 1)``
  vectors; see :func:`_unscatter` for which element holds which partial sum.
  """
  lane = jnp.arange(lanes)
  offset = lanes // 2
  while offset >= 1 and len(values) > 1:
    half = len(values) // 2
    upper = (lane & offset) != 0
    values = [jnp.where(upper, hi, lo) + _shfl_xor(jnp.where(upper, lo, hi), offset, interpret)
              for lo, hi in zip(values[:half], values[half:])]
    offset //= 2
  return values


def _unscatter(part, m, lanes):
  """``(..., V, lanes)`` outputs of :func:`_reduce_scatter` -> ``(..., m)`` sums."""
  if m >= lanes:  # element e of vector k holds the whole sum of value e * V + k
    return jnp.swapaxes(part, -1, -2).reshape(*part.shape[:-2], m)
  # element e holds a partial sum of value e // (lanes / m)
  return part[..., 0, :].reshape(*part.shape[:-2], m, lanes // m).sum(axis=-1)


def _rows_update(h, dt, dtu, a2, bt, interpret):
  """h_j <- exp(Δ A_j) h_j + B_j Δ u for every state j (rows layout)."""
  return [_exp2(dt * a2[j], interpret) * h[j] + bt[j] * dtu for j in range(len(h))]


def _rows_dot(ct, h, init=None):
  """``init + Σ_j C_j h_j``, summed in state order (rows layout)."""
  out = init
  for c, x in zip(ct, h):
    out = c * x if out is None else out + c * x
  return out


def _sigmoid(x, interpret):
  return 1.0 / (1.0 + _exp2(-x * _LOG2E, interpret))


class _Program:
  """Coordinates and masks of the current program, and row loads/stores at time t."""

  def __init__(self, p: _Plan):
    self.p = p
    pc, self.k, self.i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    self.pc = pc
    fg = pc // p.sub_blocks
    sb = pc % p.sub_blocks
    self.c0 = fg * p.group_channels + sb * p.block
    self.cols = pl.ds(self.c0, p.block)
    self.cmask = sb * p.block + jnp.arange(p.block) < p.group_channels
    self.gb = fg // (p.groups // p.groups_b)
    self.gc = fg // (p.groups // p.groups_c)
    self.nidx = pl.ds(0, p.state_pad)
    self.nmask = jnp.arange(p.state_pad) < p.state
    self.mask2 = self.nmask[:, None] & self.cmask[None, :]
    self.first_chunk = self.k * p.chunks_per_split
    self.num_chunks = jnp.minimum(p.chunks_per_split, p.chunks - self.first_chunk)

  def valid(self, t):
    return (t < self.p.length) if self.p.ragged else None

  def row(self, ref, t, valid):
    m = self.cmask if valid is None else self.cmask & valid
    return plgpu.load(ref.at[self.i, t, self.cols], mask=m, other=0.0).astype(jnp.float32)

  def store_row(self, ref, t, valid, x):
    m = self.cmask if valid is None else self.cmask & valid
    plgpu.store(ref.at[self.i, t, self.cols], x.astype(ref.dtype), mask=m)

  def bc_row(self, ref, t, group, valid):
    """B or C at time t for this program's group: ``(state_pad, 1)`` float32."""
    m = self.nmask if valid is None else self.nmask & valid
    return plgpu.load(ref.at[self.i, t, group, self.nidx], mask=m, other=0.0).astype(
        jnp.float32)[:, None]

  def vec(self, ref):
    return plgpu.load(ref.at[self.cols], mask=self.cmask, other=0.0).astype(jnp.float32)

  def tile(self, ref, *lead):
    return plgpu.load(ref.at[(*lead, self.nidx, self.cols)], mask=self.mask2, other=0.0)

  def store_tile(self, ref, x, *lead):
    plgpu.store(ref.at[(*lead, self.nidx, self.cols)], x.astype(ref.dtype), mask=self.mask2)

  # Rows layout: the state is a list over states of (block,) channel vectors.

  def state_rows(self, ref, *lead):
    return [plgpu.load(ref.at[(*lead, jnp.int32(j), self.cols)], mask=self.cmask, other=0.0)
            for j in range(self.p.state)]

  def store_state_rows(self, ref, rows, *lead):
    for j, x in enumerate(rows):
      plgpu.store(ref.at[(*lead, jnp.int32(j), self.cols)], x.astype(ref.dtype), mask=self.cmask)

  def a2_rows(self, at_ref):
    """A·log2(e) per state, from A transposed ``(state, channels)``."""
    return [x * _LOG2E for x in self.state_rows(at_ref)]

  def bc_scalars(self, ref, t, group):
    """B or C at time t as ``state`` float32 scalars (every thread reads the same value). Past the
    end of the sequence the last step is read again: Δ is 0 there, so nothing depends on it."""
    p = self.p
    if p.ragged:
      t = jnp.minimum(t, p.length - 1)
    if p.packed is None:
      return [ref[self.i, t, group, jnp.int32(j)].astype(jnp.float32) for j in range(p.state)]
    out = []
    for j in range(p.state // 2):
      w = ref[self.i, t, group, jnp.int32(j)]  # state 2j in the low half, 2j + 1 in the high
      if p.packed == "bfloat16":  # a bfloat16 is the high half of a float32
        out += [lax.bitcast_convert_type(w << 16, jnp.float32),
                lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32)]
      else:
        out += [lax.bitcast_convert_type(x.astype(jnp.uint16), jnp.float16).astype(jnp.float32)
                for x in (w & jnp.uint32(0xFFFF), w >> 16)]
    return out

  def delta(self, raw, bias, valid):
    """Δ after bias and softplus, and dΔ/draw; zero past the end of the sequence."""
    p = self.p
    x = raw if bias is None else raw + bias
    if p.softplus:
      e = _exp2(jnp.minimum(x, 20.0) * _LOG2E, p.interpret)
      dt = jnp.where(x > 20.0, x, jnp.log1p(e))
      grad = e / (1.0 + e)
    else:
      dt, grad = x, None
    if valid is not None:
      dt = jnp.where(valid, dt, 0.0)
    return dt, grad


def _unpack(refs, names, flags):
  """Splits a kernel's refs into a dict, skipping optional inputs that are absent."""
  out, it = {}, iter(refs)
  for name in names:
    out[name] = next(it) if flags.get(name, True) else None
  rest = list(it)
  return out, rest


_IN_NAMES = ("u", "delta", "at", "B", "C", "D", "z", "bias")


def _in_flags(p: _Plan):
  return {"D": p.has_d, "z": p.has_z, "bias": p.has_bias}


def _compiler_params(p: _Plan):
  return plgpu.CompilerParams(num_warps=p.num_warps, num_stages=1)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_local_kernel(*refs, p: _Plan):
  """Each split from a zero state: end state (b, K, n, d) and ΣΔ (b, K, d)."""
  if p.rows:
    return _fwd_local_kernel_rows(*refs, p=p)
  r, (hloc_ref, dsum_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.tile(r["at"]) * _LOG2E
  bias = g.vec(r["bias"]) if p.has_bias else None

  def chunk(ci, carry):
    h, dsum = carry
    c = g.first_chunk + ci
    for s in range(p.chunk):
      t = c * p.chunk + s
      valid = g.valid(t)
      u = g.row(r["u"], t, valid)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      bt = g.bc_row(r["B"], t, g.gb, valid)
      h = _exp2(dt[None, :] * a2, p.interpret) * h + bt * (dt * u)[None, :]
      dsum = dsum + dt
    return h, dsum

  h0 = jnp.zeros((p.state_pad, p.block), jnp.float32)
  h, dsum = lax.fori_loop(0, g.num_chunks, chunk, (h0, jnp.zeros((p.block,), jnp.float32)))
  g.store_tile(hloc_ref, h, g.i, g.k)
  plgpu.store(dsum_ref.at[g.i, g.k, g.cols], dsum, mask=g.cmask)


def _fwd_kernel(*refs, p: _Plan):
  """Outputs y, the state entering every chunk, and each split's end state."""
  if p.rows:
    return _fwd_kernel_rows(*refs, p=p)
  r, (h0_ref, y_ref, hs_ref, hend_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.tile(r["at"]) * _LOG2E
  bias = g.vec(r["bias"]) if p.has_bias else None
  dskip = g.vec(r["D"]) if p.has_d else None

  def chunk(ci, h):
    c = g.first_chunk + ci
    g.store_tile(hs_ref, h, g.i, c)
    for s in range(p.chunk):
      t = c * p.chunk + s
      valid = g.valid(t)
      u = g.row(r["u"], t, valid)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      bt = g.bc_row(r["B"], t, g.gb, valid)
      ct = g.bc_row(r["C"], t, g.gc, valid)
      h = _exp2(dt[None, :] * a2, p.interpret) * h + bt * (dt * u)[None, :]
      y = jnp.sum(ct * h, axis=0)
      if p.has_d:
        y = y + dskip * u
      if p.has_z:
        z = g.row(r["z"], t, valid)
        y = y * z * _sigmoid(z, p.interpret)
      g.store_row(y_ref, t, valid, y)
    return h

  h = lax.fori_loop(0, g.num_chunks, chunk, g.tile(h0_ref, g.i, g.k))
  g.store_tile(hend_ref, h, g.i, g.k)


def _fwd_local_kernel_rows(*refs, p: _Plan):
  r, (hloc_ref, dsum_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.a2_rows(r["at"])
  bias = g.vec(r["bias"]) if p.has_bias else None

  def chunk(ci, carry):
    h, dsum = carry
    c = g.first_chunk + ci
    for s in range(p.chunk):
      t = c * p.chunk + s
      valid = g.valid(t)
      u = g.row(r["u"], t, valid)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      bt = g.bc_scalars(r["B"], t, g.gb)
      dtu = dt * u
      h = _rows_update(h, dt, dtu, a2, bt, p.interpret)
      dsum = dsum + dt
    return h, dsum

  zero = jnp.zeros((p.block,), jnp.float32)
  h, dsum = lax.fori_loop(0, g.num_chunks, chunk, ([zero] * p.state, zero))
  g.store_state_rows(hloc_ref, h, g.i, g.k)
  plgpu.store(dsum_ref.at[g.i, g.k, g.cols], dsum, mask=g.cmask)


def _fwd_kernel_rows(*refs, p: _Plan):
  r, (h0_ref, y_ref, hs_ref, hend_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.a2_rows(r["at"])
  bias = g.vec(r["bias"]) if p.has_bias else None
  dskip = g.vec(r["D"]) if p.has_d else None

  def chunk(ci, h):
    c = g.first_chunk + ci
    g.store_state_rows(hs_ref, h, g.i, c)
    for s in range(p.chunk):
      t = c * p.chunk + s
      valid = g.valid(t)
      u = g.row(r["u"], t, valid)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      bt = g.bc_scalars(r["B"], t, g.gb)
      ct = g.bc_scalars(r["C"], t, g.gc)
      dtu = dt * u
      h = _rows_update(h, dt, dtu, a2, bt, p.interpret)
      y = _rows_dot(ct, h, dskip * u if p.has_d else None)
      if p.has_z:
        z = g.row(r["z"], t, valid)
        y = y * z * _sigmoid(z, p.interpret)
      g.store_row(y_ref, t, valid, y)
    return h

  h = lax.fori_loop(0, g.num_chunks, chunk, g.state_rows(h0_ref, g.i, g.k))
  g.store_state_rows(hend_ref, h, g.i, g.k)


def _pack(x):
  """(..., n) 16-bit -> (..., n / 2) uint32 holding states 2j (low half) and 2j + 1."""
  return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)


def _inputs(p: _Plan, u, delta, at, B, C, D, z, bias):
  if p.packed is not None:
    B, C = _pack(B), _pack(C)
  return [x for x, keep in ((u, True), (delta, True), (at, True), (B, True), (C, True),
                            (D, p.has_d), (z, p.has_z), (bias, p.has_bias)) if keep]


def _call(kernel, p: _Plan, out_shape, *args):
  # The kernels index in int32 (program ids); traced with jax_enable_x64 on, Python ints and
  # jnp.arange would be int64 and mixed index types fail. Arguments and results are 32-bit.
  with jax.enable_x64(False):
    return _pallas_call(kernel, p, out_shape, *args)


def _pallas_call(kernel, p: _Plan, out_shape, *args):
  return pl.pallas_call(
      functools.partial(kernel, p=p),
      out_shape=out_shape,
      grid=(p.channel_programs, p.splits, p.batch),
      compiler_params=_compiler_params(p),
      interpret=p.interpret,
      name=kernel.__name__.strip("_"),
  )(*args)


def _split_decay(at, dsum):
  """exp(A ΣΔ) per split: (b, K, n, d)."""
  return jnp.exp(at[None, None] * dsum[:, :, None, :])


def _affine_scan(decay, local, start, reverse):
  """Inclusive scan over axis 1 of x_k = decay_k x_{k-1} + local_k from x_{-1} = start.

  ``lax.associative_scan`` (log depth) rather than ``lax.scan``: one sequential XLA step per split
  would cost microseconds each.
  """
  local = local.at[:, -1 if reverse else 0].add(
      decay[:, -1 if reverse else 0] * start)

  def combine(first, second):  # `first` is applied first
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2

  _, out = lax.associative_scan(combine, (decay, local), axis=1, reverse=reverse)
  return out


def _forward(p: _Plan, u, delta, at, B, C, D, z, bias, h0t):
  """Returns y, states entering chunks (b, chunks, n, d) and last state (b, n, d), transposed."""
  b, l, d, n, k = p.batch, p.length, p.channels, p.state, p.splits
  ins = _inputs(p, u, delta, at, B, C, D, z, bias)
  f32 = jnp.float32
  if k > 1:
    hloc, dsum = _call(_fwd_local_kernel, p, (
        jax.ShapeDtypeStruct((b, k, n, d), f32), jax.ShapeDtypeStruct((b, k, d), f32)), *ins)
    decay = _split_decay(at, dsum)

    def step(h, xs):
      dec, loc = xs
      return dec * h + loc, h

    _, enter = lax.scan(step, h0t, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(hloc, 1, 0)))
    enter = jnp.moveaxis(enter, 0, 1)
  else:
    enter = h0t[:, None]
  y, hs, hend = _call(_fwd_kernel, p, (
      jax.ShapeDtypeStruct((b, l, d), u.dtype),
      jax.ShapeDtypeStruct((b, p.chunks, n, d), f32),
      jax.ShapeDtypeStruct((b, k, n, d), f32)), *ins, enter)
  return y, hs, hend[:, -1]


# ----------------------------------------------------------------------------------------------
# Backward.


def _dout(g: _Program, r, t, valid, dy):
  """Cotangent of C·h + D u (before the gate), and the gate's input z."""
  if not g.p.has_z:
    return dy, None
  z = g.row(r["z"], t, valid)
  return dy * z * _sigmoid(z, g.p.interpret), z


def _bwd_step_inputs(g: _Program, r, dy_ref, bias, t, valid):
  """A step's u, Δ, dΔ/draw, dy, the cotangent before the gate and z."""
  u = g.row(r["u"], t, valid)
  dt, dsp = g.delta(g.row(r["delta"], t, valid), bias, valid)
  dy = g.row(dy_ref, t, valid)
  dout, z = _dout(g, r, t, valid, dy)
  return u, dt, dsp, dy, dout, z


def _bwd_local_kernel(*refs, p: _Plan):
  """Adjoint recurrence over each split from zero: g at the split start (b, K, n, d), ΣΔ (b, K, d)."""
  if p.rows:
    return _bwd_local_kernel_rows(*refs, p=p)
  r, (dy_ref, gloc_ref, dsum_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.tile(r["at"]) * _LOG2E
  bias = g.vec(r["bias"]) if p.has_bias else None

  def chunk(ci, carry):
    gs, dsum = carry
    c = g.first_chunk + g.num_chunks - 1 - ci
    for s in reversed(range(p.chunk)):
      t = c * p.chunk + s
      valid = g.valid(t)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      dout, _ = _dout(g, r, t, valid, g.row(dy_ref, t, valid))
      ct = g.bc_row(r["C"], t, g.gc, valid)
      gs = _exp2(dt[None, :] * a2, p.interpret) * (gs + ct * dout[None, :])
      dsum = dsum + dt
    return gs, dsum

  g0 = jnp.zeros((p.state_pad, p.block), jnp.float32)
  gs, dsum = lax.fori_loop(0, g.num_chunks, chunk, (g0, jnp.zeros((p.block,), jnp.float32)))
  g.store_tile(gloc_ref, gs, g.i, g.k)
  plgpu.store(dsum_ref.at[g.i, g.k, g.cols], dsum, mask=g.cmask)


def _bwd_local_kernel_rows(*refs, p: _Plan):
  r, (dy_ref, gloc_ref, dsum_ref) = _unpack(refs, _IN_NAMES, _in_flags(p))
  g = _Program(p)
  a2 = g.a2_rows(r["at"])
  bias = g.vec(r["bias"]) if p.has_bias else None

  def chunk(ci, carry):
    gs, dsum = carry
    c = g.first_chunk + g.num_chunks - 1 - ci
    for s in reversed(range(p.chunk)):
      t = c * p.chunk + s
      valid = g.valid(t)
      dt, _ = g.delta(g.row(r["delta"], t, valid), bias, valid)
      dout, _ = _dout(g, r, t, valid, g.row(dy_ref, t, valid))
      ct = g.bc_scalars(r["C"], t, g.gc)
      gs = [_exp2(dt * a2[j], p.interpret) * (gs[j] + ct[j] * dout) for j in range(p.state)]
      dsum = dsum + dt
    return gs, dsum

  zero = jnp.zeros((p.block,), jnp.float32)
  gs, dsum = lax.fori_loop(0, g.num_chunks, chunk, ([zero] * p.state, zero))
  g.store_state_rows(gloc_ref, gs, g.i, g.k)
  plgpu.store(dsum_ref.at[g.i, g.k, g.cols], dsum, mask=g.cmask)


def _bwd_kernel(*refs, p: _Plan):
  """Gradients of one split, walking its chunks backwards from the gradient at its end."""
  if p.rows:
    return _bwd_kernel_rows(*refs, p=p)
  r, rest = _unpack(refs, _IN_NAMES, _in_flags(p))
  (hs_ref, dy_ref, gend_ref, du_ref, ddelta_ref, dz_ref, dbp_ref, dcp_ref, gstart_ref, dap_ref,
   ddp_ref, dbiasp_ref) = rest
  g = _Program(p)
  a2 = g.tile(r["at"]) * _LOG2E
  bias = g.vec(r["bias"]) if p.has_bias else None
  dskip = g.vec(r["D"]) if p.has_d else None

  step_inputs = functools.partial(_bwd_step_inputs, g, r, dy_ref, bias)

  def chunk(ci, carry):
    gs, da_acc, dd_acc, dbias_acc = carry
    c = g.first_chunk + g.num_chunks - 1 - ci
    h = g.tile(hs_ref, g.i, c)
    states = [h]
    steps = []
    # Recompute the chunk's states; everything that needs no adjoint is done on the way.
    for s in range(p.chunk):
      t = c * p.chunk + s
      valid = g.valid(t)
      u, dt, dsp, dy, dout, z = step_inputs(t, valid)
      bt = g.bc_row(r["B"], t, g.gb, valid)
      ct = g.bc_row(r["C"], t, g.gc, valid)
      h = _exp2(dt[None, :] * a2, p.interpret) * h + bt * (dt * u)[None, :]
      states.append(h)
      if p.has_z:
        out = jnp.sum(ct * h, axis=0)
        if p.has_d:
          out = out + dskip * u
        sz = _sigmoid(z, p.interpret)
        g.store_row(dz_ref, t, valid, dy * out * sz * (1.0 + z * (1.0 - sz)))
      dc = jnp.sum(h * dout[None, :], axis=1)
      plgpu.store(dcp_ref.at[g.i, t, g.pc, g.nidx], dc,
                  mask=g.nmask if valid is None else g.nmask & valid)
      if p.has_d:
        dd_acc = dd_acc + dout * u
      steps.append((u, dt, dsp, dout))
    # Walk back over the chunk. Reloading a step's inputs (cache hits) instead of keeping them
    # live across the chunk spares registers.
    for s in reversed(range(p.chunk)):
      t = c * p.chunk + s
      valid = g.valid(t)
      if p.reload:
        u, dt, dsp, _, dout, _ = step_inputs(t, valid)
      else:
        u, dt, dsp, dout = steps[s]
      bt = g.bc_row(r["B"], t, g.gb, valid)
      ct = g.bc_row(r["C"], t, g.gc, valid)
      gs = gs + ct * dout[None, :]
      decay = _exp2(dt[None, :] * a2, p.interpret)
      gdh = gs * decay * states[s]
      da_acc = da_acc + gdh * dt[None, :]
      gb_sum = jnp.sum(gs * bt, axis=0)
      ddt = jnp.sum(gdh * a2, axis=0) * (1.0 / _LOG2E) + gb_sum * u
      du = gb_sum * dt
      if p.has_d:
        du = du + dskip * dout
      g.store_row(du_ref, t, valid, du)
      draw = ddt if dsp is None else ddt * dsp
      if valid is not None:
        draw = jnp.where(valid, draw, 0.0)
      g.store_row(ddelta_ref, t, valid, draw)
      if p.has_bias:
        dbias_acc = dbias_acc + draw
      db = jnp.sum(gs * (dt * u)[None, :], axis=1)
      plgpu.store(dbp_ref.at[g.i, t, g.pc, g.nidx], db,
                  mask=g.nmask if valid is None else g.nmask & valid)
      gs = decay * gs
    return gs, da_acc, dd_acc, dbias_acc

  tile0 = jnp.zeros((p.state_pad, p.block), jnp.float32)
  vec0 = jnp.zeros((p.block,), jnp.float32)
  gs, da_acc, dd_acc, dbias_acc = lax.fori_loop(
      0, g.num_chunks, chunk, (g.tile(gend_ref, g.i, g.k), tile0, vec0, vec0))
  g.store_tile(gstart_ref, gs, g.i, g.k)
  g.store_tile(dap_ref, da_acc, g.i, g.k)
  plgpu.store(ddp_ref.at[g.i, g.k, g.cols], dd_acc, mask=g.cmask)
  plgpu.store(dbiasp_ref.at[g.i, g.k, g.cols], dbias_acc, mask=g.cmask)


def _bwd_kernel_rows(*refs, p: _Plan):
  """As :func:`_bwd_kernel`; dC and dB of a step are reduced over channels together by one
  butterfly (:func:`_reduce_scatter`) and stored as ``(V, block)`` partials."""
  r, rest = _unpack(refs, _IN_NAMES, _in_flags(p))
  (hs_ref, dy_ref, gend_ref, du_ref, ddelta_ref, dz_ref, dbcp_ref, gstart_ref, dap_ref,
   ddp_ref, dbiasp_ref) = rest
  g = _Program(p)
  n = p.state
  a2 = g.a2_rows(r["at"])
  bias = g.vec(r["bias"]) if p.has_bias else None
  dskip = g.vec(r["D"]) if p.has_d else None
  zero = jnp.zeros((p.block,), jnp.float32)
  pad = [zero] * (p.state_pad - n)

  step_inputs = functools.partial(_bwd_step_inputs, g, r, dy_ref, bias)

  def chunk(ci, carry):
    gs, da_acc, dd_acc, dbias_acc = carry
    c = g.first_chunk + g.num_chunks - 1 - ci
    h = g.state_rows(hs_ref, g.i, c)
    states = [h]
    for s in range(p.chunk):  # recompute the chunk's states
      t = c * p.chunk + s
      valid = g.valid(t)
      u, dt, dsp, dy, dout, z = step_inputs(t, valid)
      bt = g.bc_scalars(r["B"], t, g.gb)
      dtu = dt * u
      h = _rows_update(h, dt, dtu, a2, bt, p.interpret)
      states.append(h)
      if p.has_z:
        ct = g.bc_scalars(r["C"], t, g.gc)
        out = _rows_dot(ct, h, dskip * u if p.has_d else None)
        sz = _sigmoid(z, p.interpret)
        g.store_row(dz_ref, t, valid, dy * out * sz * (1.0 + z * (1.0 - sz)))
      if p.has_d:
        dd_acc = dd_acc + dout * u
    for s in reversed(range(p.chunk)):  # walk back over them
      t = c * p.chunk + s
      valid = g.valid(t)
      u, dt, dsp, _, dout, _ = step_inputs(t, valid)
      bt = g.bc_scalars(r["B"], t, g.gb)
      ct = g.bc_scalars(r["C"], t, g.gc)
      dtu = dt * u
      dc = [states[s + 1][j] * dout for j in range(n)]
      gs = [gs[j] + ct[j] * dout for j in range(n)]
      decay = [_exp2(dt * a2[j], p.interpret) for j in range(n)]
      gdh = [gs[j] * decay[j] * states[s][j] for j in range(n)]
      da_acc = [da_acc[j] + gdh[j] * dt for j in range(n)]
      gb_sum = gs[0] * bt[0]
      gda = gdh[0] * a2[0]
      for j in range(1, n):
        gb_sum = gb_sum + gs[j] * bt[j]
        gda = gda + gdh[j] * a2[j]
      ddt = gda * (1.0 / _LOG2E) + gb_sum * u
      du = gb_sum * dt
      if p.has_d:
        du = du + dskip * dout
      g.store_row(du_ref, t, valid, du)
      draw = ddt if dsp is None else ddt * dsp
      if valid is not None:
        draw = jnp.where(valid, draw, 0.0)
      g.store_row(ddelta_ref, t, valid, draw)
      if p.has_bias:
        dbias_acc = dbias_acc + draw
      db = [gs[j] * dtu for j in range(n)]
      sums = _reduce_scatter(dc + pad + db + pad, p.block, p.interpret)
      for k, x in enumerate(sums):
        plgpu.store(dbcp_ref.at[g.i, t, g.pc, jnp.int32(k), pl.ds(0, p.block)], x,
                    mask=None if valid is None else jnp.full((p.block,), valid))
      gs = [decay[j] * gs[j] for j in range(n)]
    return gs, da_acc, dd_acc, dbias_acc

  gs, da_acc, dd_acc, dbias_acc = lax.fori_loop(
      0, g.num_chunks, chunk, (g.state_rows(gend_ref, g.i, g.k), [zero] * n, zero, zero))
  g.store_state_rows(gstart_ref, gs, g.i, g.k)
  g.store_state_rows(dap_ref, da_acc, g.i, g.k)
  plgpu.store(ddp_ref.at[g.i, g.k, g.cols], dd_acc, mask=g.cmask)
  plgpu.store(dbiasp_ref.at[g.i, g.k, g.cols], dbias_acc, mask=g.cmask)


def _backward(p: _Plan, res, dy, dlast_t):
  u, delta, at, B, C, D, z, bias, hs = res
  b, l, d, n, k = p.batch, p.length, p.channels, p.state, p.splits
  f32 = jnp.float32
  ins = _inputs(p, u, delta, at, B, C, D, z, bias)
  if k > 1:
    gloc, dsum = _call(_bwd_local_kernel, p, (
        jax.ShapeDtypeStruct((b, k, n, d), f32), jax.ShapeDtypeStruct((b, k, d), f32)),
        *ins, dy)
    # gend[k] = decay[k+1] gend[k+1] + gloc[k+1], gend[K-1] = dlast: the same scan, reversed.
    before = _affine_scan(_split_decay(at, dsum)[:, 1:], gloc[:, 1:], dlast_t, reverse=True)
    gend = jnp.concatenate([before, dlast_t[:, None]], axis=1)
  else:
    gend = dlast_t[:, None]
  nprog = p.channel_programs
  grads = (jax.ShapeDtypeStruct(u.shape, u.dtype),
           jax.ShapeDtypeStruct(delta.shape, delta.dtype),
           jax.ShapeDtypeStruct(z.shape if p.has_z else (1, 1, 1), z.dtype if p.has_z else f32))
  params = (jax.ShapeDtypeStruct((b, k, n, d), f32),
            jax.ShapeDtypeStruct((b, k, n, d), f32),
            jax.ShapeDtypeStruct((b, k, d), f32),
            jax.ShapeDtypeStruct((b, k, d), f32))
  if p.rows:
    m = 2 * p.state_pad
    part = jax.ShapeDtypeStruct((b, l, nprog, max(m // p.block, 1), p.block), f32)
    du, ddelta, dz, dbcp, gstart, dap, ddp, dbiasp = _call(
        _bwd_kernel, p, (*grads, part, *params), *ins, hs, dy, gend)
    dbc = _unscatter(dbcp, m, p.block)
    dcp, dbp = dbc[..., :n], dbc[..., p.state_pad:p.state_pad + n]
  else:
    part = jax.ShapeDtypeStruct((b, l, nprog, n), f32)
    du, ddelta, dz, dbp, dcp, gstart, dap, ddp, dbiasp = _call(
        _bwd_kernel, p, (*grads, part, part, *params), *ins, hs, dy, gend)

  def group_sum(part, groups, dtype):
    per = nprog // groups
    return part.reshape(b, l, groups, per, n).sum(axis=3).astype(dtype)

  dB = group_sum(dbp, p.groups_b, B.dtype)
  dC = group_sum(dcp, p.groups_c, C.dtype)
  dA = dap.sum(axis=(0, 1)).T
  dD = ddp.sum(axis=(0, 1)) if p.has_d else None
  dbias = dbiasp.sum(axis=(0, 1)) if p.has_bias else None
  dh0 = jnp.swapaxes(gstart[:, 0], 1, 2)
  return du, ddelta, dA, dB, dC, dD, (dz if p.has_z else None), dbias, dh0


# ----------------------------------------------------------------------------------------------
# Public entry points, custom VJP.


unsupported_reason = scan_unsupported_reason


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, *,
                   delta_softplus: bool = False, interpret: bool = False,
                   config: Config | None = None):
  """Fused selective scan on canonical inputs (see :func:`ssmax.scan.check_inputs`).

  Args:
    u, delta: ``(batch, length, channels)``, float32/bfloat16/float16.
    A: ``(channels, state)`` float32, state <= 256.
    B, C: ``(batch, length, groups, state)``; groups divide the channels contiguously.
    D, delta_bias: optional ``(channels,)`` float32.
    z: optional ``(batch, length, channels)`` gate.
    initial_state: optional ``(batch, channels, state)`` float32.
    delta_softplus: apply softplus to ``delta + delta_bias``.
    interpret: run the kernels in Pallas's interpreter (CPU).
    config: optional :class:`Config` overriding the blocking.

  Returns:
    ``(y, last_state)``: ``y`` ``(batch, length, channels)`` in ``u.dtype``, ``last_state``
    ``(batch, channels, state)`` float32. Differentiable in every array argument (``last_state``'s
    cotangent included) through a custom VJP.
  """
  reason = unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state)
  if reason is not None:
    raise ValueError(f"the fused selective scan cannot take these inputs: {reason}")
  u, delta, A, B, C, D, z, delta_bias, initial_state = as_arrays(
      u, delta, A, B, C, D, z, delta_bias, initial_state)
  config = config or Config()
  primal_plan = _make_plan(u, B, C, A, D, z, delta_bias, delta_softplus, interpret, config,
                           primal_only=True)
  fwd_plan = _make_plan(u, B, C, A, D, z, delta_bias, delta_softplus, interpret, config)
  bwd_plan = _make_plan(u, B, C, A, D, z, delta_bias, delta_softplus, interpret, config,
                        backward=True)
  # Both passes must agree on where the saved chunk states lie.
  bwd_plan = dataclasses.replace(bwd_plan, chunk=fwd_plan.chunk, chunks=fwd_plan.chunks)
  return _scan_vjp(primal_plan, fwd_plan, bwd_plan, u, delta, A, B, C, D, z, delta_bias,
                   initial_state)


# A floor on A: a ragged last chunk runs its padding steps with Δ = 0, where A = -inf would make
# Δ·A = 0·(-inf) = NaN. Any A below this (times log2 e still finite) decays to 0 in one step.
_A_FLOOR = -0.5 * float(jnp.finfo(jnp.float32).max)


def _prepare(p: _Plan, A, initial_state):
  at = jnp.maximum(A.astype(jnp.float32), _A_FLOOR).T
  if initial_state is None:
    h0t = jnp.zeros((p.batch, p.state, p.channels), jnp.float32)
  else:
    h0t = jnp.swapaxes(initial_state.astype(jnp.float32), 1, 2)
  return at, h0t


def _f32(x):
  return None if x is None else x.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_vjp(pp, fp, bp, u, delta, A, B, C, D, z, delta_bias, initial_state):
  """Without differentiation only ``pp`` (the primal-only plan) is used."""
  at, h0t = _prepare(pp, A, initial_state)
  y, _, last = _forward(pp, u, delta, at, B, C, _f32(D), z, _f32(delta_bias), h0t)
  return y, jnp.swapaxes(last, 1, 2)


def _scan_fwd(pp, fp, bp, u, delta, A, B, C, D, z, delta_bias, initial_state):
  at, h0t = _prepare(fp, A, initial_state)
  D32, bias32 = _f32(D), _f32(delta_bias)
  y, hs, last = _forward(fp, u, delta, at, B, C, D32, z, bias32, h0t)
  res = (u, delta, at, B, C, D32, z, bias32, hs, A, D, delta_bias, initial_state)
  return (y, jnp.swapaxes(last, 1, 2)), res


def _scan_bwd(pp, fp, bp, res, cts):
  u, delta, at, B, C, D32, z, bias32, hs, A, D, delta_bias, initial_state = res
  dy, dlast = cts
  dlast_t = jnp.swapaxes(dlast.astype(jnp.float32), 1, 2)
  du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _backward(
      bp, (u, delta, at, B, C, D32, z, bias32, hs), dy.astype(u.dtype), dlast_t)
  cast = lambda g, x: None if x is None else g.astype(x.dtype)
  return (du, ddelta, cast(dA, A), dB, dC, cast(dD, D), dz, cast(dbias, delta_bias),
          cast(dh0, initial_state))


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)
