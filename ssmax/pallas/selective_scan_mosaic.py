"""Fused selective scan (Mamba's S6) in Pallas Mosaic GPU (Hopper), forward and backward.

Semantics are those of :func:`ssmax.scan.selective_scan` (``_sequential`` there is the reference)::

    Δ_t = softplus(delta_t + bias)            (bias and softplus optional)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t    y_t = (C_t·h_t + D u_t) · silu(z_t)

Layout. One CTA = one warpgroup (128 threads) owns a block of 128 channels of one batch row and one
*segment* of the sequence; thread ``i`` owns channel ``i`` and keeps that channel's states in
registers as a tuple of ``(128,)`` vectors (``Layout.WG_STRIDED``, one element per thread), so every
op of the recurrence is elementwise and the sums over states (C·h, dΔ, du) stay in the thread.
Channels are padded per group to a multiple of 128 (a block never straddles a B/C group), the
state to a multiple of 4 (TMA rows of at least 16 bytes), the length to whole 32-token tiles. Padded
tokens get Δ = 0 exactly (a mask, not a padding value), and ``A·log2(e)`` is clamped to the most
negative finite float, so padding cannot make 0·∞: A = -inf stays NaN-free.

Pipeline. The CTA walks its segment in tiles of ``TILE`` = 32 tokens: Δ, u, z (and dy in the
backward) as ``(32, 128)`` tiles in their own dtype, B and C as ``(32, N)`` float32 tiles, read
as warp-uniform scalars. A ring of ``stages`` shared-memory slots is filled by TMA
(``copy_gmem_to_smem``) with one mbarrier per slot; after a tile, one ``commit_smem`` (fence and
warpgroup barrier) frees the slot for the tile ``stages`` ahead. ``exp2`` with A pre-scaled by
log2(e); y goes straight from registers to global memory (coalesced rows, no SMEM round trip).

Sequence segments. When batch × channel blocks cannot fill the SMs (batch 1 × 16 blocks on 132
SMs), each row is cut into ``S`` segments (:func:`choose_segments`, a cost model in code): a
pre-pass kernel runs each segment but the last from a zero state and returns its end state and ΣΔ;
a ``lax.scan`` over segments chains them (the segment's total decay is exp(A·ΣΔ)); the main
kernel then runs every segment from its true entering state. The backward does the same in
reverse with the adjoint recurrence g_{t-1} = exp(Δ_t A)(g_t + C_t dout_t).

Packed documents. ``segment_ids`` become a per-token reset bias, -inf where a document starts and
0 elsewhere, added to every state's ``exp2`` argument: the decay is exactly 0 there, and so are its
derivatives, so neither the forward nor the backward needs another change. The bias travels as a
(TILE, 4) float32 tile beside B and C; a sequence segment holding a reset passes no state through
it (the combine multiplies its total decay by 0).

Saved for the backward: the (padded) inputs and the float32 state entering every tile,
``(batch, tiles, N, channels)`` — 1/32 of a per-token history.

Backward. Per tile (last first): pass 1 recomputes the tile forward from its saved state and parks
the state entering every sub-tile of ``sub`` tokens in shared memory (each thread its own
column: no synchronisation); pass 2 takes sub-tiles last first, recomputes their states and
decays into registers and runs the adjoint back over them. dB and dC of a token are sums over
channels: the 2N per-thread products go through a warp butterfly reduce-scatter (31 shuffles per
32 products, ``inline_mgpu``), each warp's sums land in a shared row, and once per tile the four
warps' rows are added and written as this block's partial sums; XLA adds the blocks. dA, dD and
dbias are per-(segment, batch) partials that XLA adds: every sum has a fixed order, so the
backward is deterministic (no atomics).

Two backward warpgroups (``Config.bwd_warpgroups``, the default from 8 states): the CTA's two
warpgroups each take half of the states of the same 128 channels (:func:`_bwd_call_wg2`), so
each scheduler has two warps to issue from; the second hands its per-token partial sums over its
states (dΔ, du, C·h) to the first through a shared slot per sub-tile (full/empty mbarriers), and
the first finishes and stores the token's gradients. Nsight Compute, 130m-train, H200: 2.75
instead of 2.25 instructions issued per active cycle (results/profile_scan/2026-12-04_h200).
The backward's sequence segments may fill up to 4 CTAs per SM (its pre-pass runs the adjoint
only): 130m-train's 96 CTAs, on 96 of 132 SMs, become 384 in 3 waves of 16 tiles.

State sizes. Up to ``MAX_STATE_PER_CALL`` = 16 states run in one kernel; larger states (to 256)
run as slices of 16 whose float32 partial sums XLA adds (y, du and dΔ are sums over states; the D
skip and the z gate, and dz, dD, are then done by XLA). Every slice shares one lowering.

Compile cost (JAX 0.11.2, H100, ``jit(...).lower().compile()``): the token loops are unrolled
``primal_unroll`` = 8 (forward without saving), ``unroll`` = 4 (forward with saving, pre-passes) and
``sub`` = 2 (backward; 4 with two warpgroups, whose exchange slots leave no room for 2) tokens deep
inside ``fori_loop``s. With Lane lowering semantics (``Config.lowering``): forward 1.4-2.1 s,
forward+backward 3.7-6.5 s at the benchmark shapes (results/bench_scan/2026-11-27_h100_lane);
with two backward warpgroups 5.8-11.9 s (H200, results/bench_scan/2026-12-04_h200_wg2). With Warpgroup semantics, which run Mosaic GPU's layout
inference first, they took 10-26 s and 17-37 s. State 32 in one kernel lowered for minutes (under
Warpgroup semantics), hence the 16-state slices.

Measured (H200, bf16, softplus/z/D on, median of 2 rounds of 20 x 5 enqueued calls,
results/bench_scan/2026-12-04_h200_wg2): forward 0.307 / 0.306 / 0.888 ms and forward+backward
1.248 / 1.339 / 3.289 ms at 130m-train / 1.4b-train / long-32k; jax-linear-attention in the same
run: 0.320 / 0.329 / 4.116 and 1.319 / 1.411 / 6.811 ms.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssmax import sharding
from ssmax.pallas.common import LOG2E as _LOG2E
from ssmax.pallas.common import as_arrays, scan_unsupported_reason

TILE = 32  # tokens per TMA tile
BLOCK = 128  # channels per CTA: one per thread of the warpgroup
_DBC_ROWS = TILE * 16 // BLOCK  # rows of 128 per warpgroup and tile for its dB/dC partial sums
MAX_STATE_PER_CALL = 16  # larger states run as slices of this many (registers, compile time)
SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on an H100
_LN2 = 0.6931471805599453
_F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)
_VEC = plgpu.Layout.WG_STRIDED((BLOCK,), vec_size=1)  # thread i holds channel i
_RESET_COLS = 4  # the reset bias travels as (TILE, 4) float32 tiles: TMA rows of 16 bytes
_XCH = 3  # per token, the second backward warpgroup's partial dΔ, du and C·h
# Segments chained per loop iteration between the passes: the cost model picks at most 2 CTAs per
# SM in the forward and 4 in the backward (16 and 33 segments at long-32k: 15 and 32 chain steps,
# fully unrolled), but Config.segments may ask for hundreds.
_CHAIN_UNROLL = 32


@dataclasses.dataclass(frozen=True)
class Config:
  """Blocking knobs; ``None`` picks a default from the shapes.

  Attributes:
    segments: sequence segments per (batch row, channel block) in the forward; default from
      :func:`choose_segments`.
    bwd_segments: the same for the backward.
    stages: TMA ring depth of the forward.
    bwd_stages: TMA ring depth of the backward (default: 2, or 1 where shared memory is short).
    unroll: tokens per iteration of the token loops (forward with saved states, pre-passes).
    primal_unroll: the same for the forward that saves nothing (no backward follows): 8 ran
      7% faster than 4 at 130m-train on an H200 but lowered in 12 s instead of 4 (Warpgroup
      lowering, below).
    sub: tokens per register sub-tile of the backward (default: the smallest that fits SMEM).
    early_pair: in the backward, take the dB/dC butterfly's first step per state as soon as
      that state's two products exist (16 live values instead of 32). Correct on the GPU but no
      faster (H100 130m-train fwd+bwd 1.359 vs 1.327 ms) and slower to lower: off by default.
    num_sms: SMs the cost model fills (default: from the device, else 132).
    reset_tiles: with ``segment_ids``, the forward branches per tile on whether the tile holds a
      reset, so that tiles without one skip the reset bias. Off by default: the bias rides in the
      FMA before each ``exp2`` (``Δ·A + bias``), so it costs nearly nothing, while the branch
      costs. Timed in alternating pairs on an H100 (``results/bench_scan/2026-11-26_h100_paired``),
      the forward with packed ids over the same forward without: 1.002 (130m-train) and 1.004
      (1.4b-train) without the branch, 1.076 and 1.062 with it. The branch also lengthens the
      packed forward's compile (24-44 s in three runs, against 11-15 s in two without it).
    lowering: Mosaic GPU's lowering semantics, ``"lane"`` (default) or ``"warpgroup"`` (Pallas's
      default). The kernels fix every register layout themselves (``Layout.WG_STRIDED``), so
      Lane semantics, which take the layouts as written, lower them in 1-5 s; Warpgroup semantics
      first run Mosaic GPU's layout inference over every op of the unrolled token loops, 86-90% of
      a 19-45 s lowering at the benchmark shapes (profiled on a CPU:
      results/bench_scan/2026-11-27_h100_lane/lowering_profile.py).
    bwd_warpgroups: warpgroups per backward CTA, 1 or 2. With 2 each takes half of the states of
      the same 128 channels (two warps per scheduler hide each other's latency); the second
      hands its per-token partial sums (dΔ, du and C·h) to the first through shared memory, one
      sub-tile at a time. Default: 2 from 8 states up (1 with ``early_pair``).
  """

  segments: int | None = None
  bwd_segments: int | None = None
  stages: int = 3
  bwd_stages: int | None = None
  unroll: int = 4
  primal_unroll: int = 8
  sub: int | None = None
  early_pair: bool = False
  num_sms: int | None = None
  reset_tiles: bool = False
  lowering: str = "lane"
  bwd_warpgroups: int | None = None


_LOWERINGS = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}


def _round_up(x, m):
  return -(-x // m) * m


def _num_sms(config: Config) -> int:
  if config.num_sms:
    return config.num_sms
  try:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132)
  except Exception:  # no device visible: assume an H100 SXM
    return 132


def choose_segments(ctas: int, tiles: int, num_sms: int, prepass_cost: float,
                    launch_tiles: float = 8.0, max_per_sm: int = 2) -> int:
  """Segments per row that minimise the estimated time, in units of one CTA's tile.

  Each of ``ctas * s`` CTAs walks ``ceil(tiles / s)`` tiles, ``num_sms`` at a time (waves); the
  pre-pass (``prepass_cost`` of a main tile per tile) runs on ``s - 1`` segments; ``launch_tiles``
  charges the extra launches and the combine. Ties go to more segments (more CTAs to hide
  latency), up to ``max_per_sm`` CTAs per SM. Calibrated on an H200: the forward (run3):
  130m-train (96 CTAs) is fastest unsplit, long-32k (16 CTAs) split in 16 beats 8 (1.02 vs
  1.12 ms); the backward (results/bench_scan/2026-12-04_h200_wg2): 130m-train in 4 segments
  (384 CTAs, 3 waves of 16 tiles instead of one of 64 on 96 of the 132 SMs) beats unsplit.
  """
  def cost(s):
    per = -(-tiles // s)
    main = -(-ctas * s // num_sms) * per
    if s == 1:
      return main
    pre = -(-ctas * (s - 1) // num_sms) * per * prepass_cost
    return main + pre + launch_tiles

  best = 1
  for s in range(2, tiles + 1):
    if ctas * s > max_per_sm * num_sms:
      break
    if cost(s) <= cost(best) + 1e-9:
      best = s
  return best


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static blocking of one call (hashable: it parameterises the kernels)."""

  batch: int
  length: int
  channels: int
  state: int
  groups_b: int
  groups_c: int
  groups: int  # fine groups: lcm(groups_b, groups_c)
  group_channels: int  # channels per fine group
  group_channels_pad: int  # ... padded to a multiple of BLOCK
  state_pad: int
  tiles: int
  segments: int
  bwd_segments: int
  stages: int
  bwd_stages: int
  unroll: int
  primal_unroll: int
  sub: int
  early_pair: bool
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  interpret: bool
  has_resets: bool = False  # segment_ids: the decay is 0 where a new segment starts
  f32_out: bool = False  # state slices: y, dΔ, du are float32 partial sums
  # Sequence parallelism: the mesh axis the length is split over (inside shard_map). The
  # pre-passes then cover every segment, and the shards' totals are chained across devices.
  axis: str | None = None
  reset_tiles: bool = False  # Config.reset_tiles (used with has_resets only)
  lowering: str = "lane"  # Config.lowering
  bwd_wg: int = 1  # Config.bwd_warpgroups

  @property
  def dp(self):
    return self.groups * self.group_channels_pad

  @property
  def nblk(self):
    return self.dp // BLOCK

  @property
  def bpg(self):  # channel blocks per fine group
    return self.group_channels_pad // BLOCK

  @property
  def lp(self):
    return self.tiles * TILE

  @property
  def ragged(self):
    return self.lp != self.length

  @property
  def products(self):  # per token: dC at [0, np), dB at [16, 16 + np) (np <= 16 per kernel)
    return 32


def _bwd_smem(p_state_pad, tile_bytes, stages, sub, products, resets=False, wg=1):
  ring = stages * (4 * TILE * BLOCK * tile_bytes + 2 * TILE * p_state_pad * 4
                   + resets * TILE * _RESET_COLS * 4)
  subs = (TILE // sub) * p_state_pad * BLOCK * 4
  part = 4 * TILE * products * 4
  xch = (wg - 1) * TILE * _XCH * BLOCK * 4  # the second warpgroup's partial sums, one tile
  return ring + subs + part + xch


def _make_plan(u, delta, z, B, C, A, D, delta_bias, softplus, interpret, config: Config,
               resets: bool = False) -> _Plan:
  if config.lowering not in _LOWERINGS:
    raise ValueError(f"Config.lowering must be one of {tuple(_LOWERINGS)}; got {config.lowering!r}")
  for name in ("unroll", "primal_unroll", "sub"):
    v = getattr(config, name)
    if v is not None and (v < 1 or TILE % v):
      raise ValueError(f"Config.{name} must divide the tile of {TILE} tokens; got {v}")
  b, l, d = u.shape
  n = A.shape[1]
  gb, gc = B.shape[2], C.shape[2]
  g = math.lcm(gb, gc)
  cpg = d // g
  cpgp = _round_up(cpg, BLOCK)
  np_ = _round_up(n, 4)
  tiles = -(-l // TILE)
  ctas = b * g * (cpgp // BLOCK)
  sms = _num_sms(config)
  # Pre-pass cost per tile relative to the main pass (no y stores / no dB,dC reduction).
  seg = config.segments or choose_segments(ctas, tiles, sms, 0.6)
  # The backward's pre-pass runs the adjoint only (~1/4 of a main tile) and its segments pay off
  # up to ~4 waves: 96 CTAs (130m-train) leave 36 of 132 SMs idle unsplit.
  bseg = config.bwd_segments or choose_segments(ctas, tiles, sms, 0.25, 2.0, 4)
  seg, bseg = max(1, min(seg, tiles)), max(1, min(bseg, tiles))
  # Uneven segments: all but the last hold ceil(tiles / S) tiles.
  seg = -(-tiles // -(-tiles // seg))
  bseg = -(-tiles // -(-tiles // bseg))
  tiled = (u, delta) + ((z,) if z is not None else ())
  tile_bytes = max(jnp.dtype(x.dtype).itemsize for x in tiled)
  if np_ > MAX_STATE_PER_CALL:  # sliced: slices of MAX_STATE_PER_CALL, float32 dy
    np_, tile_bytes = _round_up(n, MAX_STATE_PER_CALL), 4
  np_call = min(np_, MAX_STATE_PER_CALL)
  wg = config.bwd_warpgroups or (1 if config.early_pair or np_call < 8 else 2)
  if wg not in (1, 2):
    raise ValueError(f"Config.bwd_warpgroups must be 1 or 2; got {wg}")
  if wg == 2 and config.early_pair:
    raise ValueError("Config.early_pair applies to one backward warpgroup (bwd_warpgroups=1)")
  stages, sub = _fit_bwd(np_call, tile_bytes, config, resets, wg)
  return _Plan(b, l, d, n, gb, gc, g, cpg, cpgp, np_, tiles, seg, bseg, config.stages, stages,
               config.unroll, config.primal_unroll, sub, config.early_pair, D is not None,
               z is not None,
               delta_bias is not None,
               bool(softplus), bool(interpret), bool(resets), bwd_wg=wg)


def _fit_bwd(np_, tile_bytes, config: Config, resets: bool = False, wg: int = 1):
  """Backward ring depth and register sub-tile that fit shared memory (short sub-tiles first:
  they keep the recomputed states in registers without spilling). Two warpgroups take the
  products of token pairs together, so their sub-tiles are even."""
  products = 32
  stages = config.bwd_stages or 2
  sub = config.sub
  if wg == 2 and sub is not None and sub % 2:
    raise ValueError(f"Config.sub must be even with two backward warpgroups; got {sub}")
  fits = lambda stages, sub: _bwd_smem(np_, tile_bytes, stages, sub, products, resets,
                                       wg) <= SMEM_BYTES
  if sub is None:
    for sub in (2, 4, 8, 16, 32):
      if fits(stages, sub):
        break
    else:
      stages, sub = 1, 4
  while not fits(stages, sub) and stages > 1:
    stages -= 1
  if not fits(stages, sub):
    raise ValueError(f"the backward's shared memory exceeds {SMEM_BYTES} bytes with sub={sub} "
                     f"and {wg} warpgroup(s); use a longer Config.sub")
  return stages, sub


# ----------------------------------------------------------------------------------------------
# Layout changes done by XLA around the kernels (no-ops at aligned shapes).


def _chan(p: _Plan, x):
  """(b, L, d) -> (b, Lp, dp): pad time to whole tiles and each group's channels to blocks."""
  b, l, d = x.shape
  if p.lp == l and p.group_channels_pad == p.group_channels:
    return x
  x = x.reshape(b, l, p.groups, p.group_channels)
  x = jnp.pad(x, ((0, 0), (0, p.lp - l), (0, 0), (0, p.group_channels_pad - p.group_channels)))
  return x.reshape(b, p.lp, p.dp)


def _unchan(p: _Plan, x):
  if p.lp == p.length and p.group_channels_pad == p.group_channels:
    return x
  x = x.reshape(x.shape[0], p.lp, p.groups, p.group_channels_pad)
  return x[:, :p.length, :, :p.group_channels].reshape(x.shape[0], p.length, p.channels)


def _vec_pad(p: _Plan, x, value=0.0):
  """(d,) -> (dp,) float32."""
  x = x.astype(_F32).reshape(p.groups, p.group_channels)
  x = jnp.pad(x, ((0, 0), (0, p.group_channels_pad - p.group_channels)), constant_values=value)
  return x.reshape(p.dp)


def _state_pad(p: _Plan, x):
  """(..., d, n) -> (..., np, dp) float32."""
  lead = x.shape[:-2]
  x = x.astype(_F32).reshape(*lead, p.groups, p.group_channels, p.state)
  pads = [(0, 0)] * len(lead) + [(0, 0), (0, p.group_channels_pad - p.group_channels),
                                 (0, p.state_pad - p.state)]
  x = jnp.pad(x, pads).reshape(*lead, p.dp, p.state_pad)
  return jnp.swapaxes(x, -1, -2)


def _state_unpad(p: _Plan, x):
  """(..., np, dp) -> (..., d, n)."""
  lead = x.shape[:-2]
  x = jnp.swapaxes(x, -1, -2).reshape(*lead, p.groups, p.group_channels_pad, p.state_pad)
  return x[..., :p.group_channels, :p.state].reshape(*lead, p.channels, p.state)


def _bc(p: _Plan, x):
  """(b, L, groups, n) -> (b, groups, Lp, np) float32: a tile is one contiguous TMA box."""
  x = jnp.swapaxes(x.astype(_F32), 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, p.lp - p.length), (0, p.state_pad - p.state)))


# ----------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _vec(ref):
  x = plgpu.load(ref, layout=_VEC, optimized=False)
  # Inside shard_map a load from an input keeps the input's varying-axis type, but the kernel's
  # arithmetic is traced with that check off and drops it, so loop carries would change type:
  # x * 1 (folded by the compiler) gives the load the arithmetic's plain type.
  return x * 1.0 if jax.typeof(x).mat.varying else x


def _full(value):
  return plgpu.layout_cast(jnp.full((BLOCK,), value, _F32), _VEC)


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
  """log(1 + e^x) and its derivative; x > 20 passes through (as the reference)."""
  e = jnp.exp(jnp.minimum(x, 20.0))
  w = 1.0 + e
  # log1p(e) without a log1p primitive: log(w) · e / (w - 1) is exact to a few ulp.
  lp = jnp.where(w == 1.0, e, jnp.log(w) * (e / (w - 1.0)))
  return jnp.where(x > 20.0, x, lp), e / w


def _kernel(p: _Plan, name, body, grid, *, out_type, **kwargs):
  """``body`` as a Mosaic GPU kernel over ``grid``, callable on its input arrays."""
  interpret = plgpu.InterpretGPUParams() if p.interpret else None

  def call(*args):
    # No automatic barriers: a thread only touches its own channel's column of the shared tiles;
    # refilling a slot and the dB/dC rows are fenced explicitly with commit_smem.
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=("d", "b", "s"), kernel_name=name,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                             lowering_semantics=_LOWERINGS[p.lowering]),
        **kwargs)
    # Indices are int32 (block ids); with jax_enable_x64 on, Python ints would trace as int64.
    with jax.enable_x64(False):
      return _varying_like(kernel(*args), args)

  return call


def _varying_like(outs, args):
  """``outs`` typed as varying along every mesh axis some input varies along. Inside
  ``shard_map`` a kernel's results come back typed as the same on every shard (Mosaic GPU traces
  kernels with the varying-axis check off); they are per shard, like the inputs."""
  axes = set()
  for a in jax.tree.leaves(args):
    axes |= set(jax.typeof(a).mat.varying)
  if not axes:
    return outs

  def vary(x):
    missing = tuple(sorted(axes - set(jax.typeof(x).mat.varying)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(vary, outs)


class _Ring:
  """A ring of TMA-filled tile slots: ``names`` are (b, Lp, dp) arrays copied as (TILE, BLOCK)
  tiles, ``bc_names`` (b, groups, Lp, np) arrays copied as (TILE, np) tiles."""

  def __init__(self, refs, names, bc_names, groups, bars, stages, bi, di, cols):
    self.refs, self.names, self.bc_names, self.groups = refs, names, bc_names, groups
    self.bars, self.stages, self.bi, self.cols = bars, stages, bi, cols

  def fetch(self, n, slot):
    rows = pl.ds(n * TILE, TILE)
    bar = self.bars.at[slot]
    for k in self.names:
      plgpu.copy_gmem_to_smem(self.refs[k].at[self.bi, rows, self.cols],
                              self.refs[k + "_s"].at[slot], bar)
    for k in self.bc_names:
      plgpu.copy_gmem_to_smem(self.refs[k].at[self.bi, self.groups[k], rows],
                              self.refs[k + "_s"].at[slot], bar)


def _prologue(count, min_count, stages, fetch):
  """Fill the first ``stages`` slots; ``count`` (traced) tiles, at least ``min_count``."""
  for i in range(stages):
    if i < min_count:
      fetch(i)
    else:
      pl.when(i < count)(functools.partial(fetch, i))


def _smem(p: _Plan, arrays, names, bc_names, stages):
  out = {k + "_s": plgpu.SMEM((stages, TILE, BLOCK), arrays[k].dtype) for k in names}
  for k in bc_names:
    out[k + "_s"] = plgpu.SMEM((stages, TILE, arrays[k].shape[-1]), _F32)
  out["bars"] = plgpu.Barrier(num_arrivals=len(names) + len(bc_names), num_barriers=stages)
  return out


def _groups_of(p: _Plan, di):
  fg = di // p.bpg
  return {"B": fg // (p.groups // p.groups_b), "C": fg // (p.groups // p.groups_c), "rb": 0}


def _delta(p: _Plan, raw, bias, tok):
  """Δ, dΔ/draw (None without softplus), and the raw input x; Δ = 0 past the sequence end."""
  x = raw.astype(_F32)
  if p.has_bias:
    x = x + bias
  if p.softplus:
    dt, dsp = _softplus(x)
  else:
    dt, dsp = x, None
  if p.ragged:
    dt = dt * (tok < p.length).astype(_F32)
  return dt, dsp


def _reset_bias(p: _Plan, t_s, t):
  """0, or -inf where a new segment starts at token ``t`` of the tile (None without resets)."""
  return t_s["rb"][t, 0] if p.has_resets else None


def _tile_has_reset(t_s):
  """Whether the tile in ``t_s`` holds a reset (column 1 of its reset-bias rows)."""
  return t_s["rb"][0, 1] != 0


def _decay(dt, a2j, rb):
  """exp(Δ A) of one state; exactly 0 at a reset, where ``rb`` = -inf. Its derivatives are then 0
  too, so the backward needs nothing more than this decay."""
  return jnp.exp2(dt * a2j if rb is None else dt * a2j + rb)


# ----------------------------------------------------------------------------------------------
# Forward.


@functools.partial(jax.jit, static_argnums=(0, 1))  # one lowering per plan, shared by slices
def _fwd_call(p: _Plan, mode: str, arrays):
  """``mode``: "local" (pre-pass: segments 0..S-2 from zero, 0..S-1 with ``p.axis``; end state
  and ΣΔ) or "main" / "main_save" (y, the last state, and with "_save" the state entering every
  tile)."""
  main = mode != "local"
  whole = main or p.axis is not None  # the last (shorter) segment is scanned too
  save = mode == "main_save"
  n_st, nt, ss = p.state_pad, p.tiles, p.segments
  per = -(-nt // ss)
  names = ["dt", "u"] + (["z"] if (main and p.has_z) else [])
  bc_names = ["B"] + (["C"] if main else []) + (["rb"] if p.has_resets else [])
  vec_names = (["bias"] if p.has_bias else []) + (["D"] if (main and p.has_d) else []) + ["a2t"]
  in_names = names + bc_names + vec_names + (["enter"] if main else [])
  f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
  if main:
    out_names = ["y", "last"] + (["states"] if save else [])
    y_dtype = _F32 if p.f32_out else arrays["u"].dtype
    out_type = [jax.ShapeDtypeStruct((p.batch, p.lp, p.dp), y_dtype),
                f32(p.batch, n_st, p.dp)]
    if save:
      out_type.append(f32(p.batch, nt, n_st, p.dp))
    grid_s = ss
  else:
    out_names = ["hloc", "dsum"]
    grid_s = ss if whole else ss - 1
    out_type = [f32(p.batch, grid_s, n_st, p.dp), f32(p.batch, grid_s, p.dp)]
  stages = max(1, min(p.stages, per))
  scratch = _smem(p, arrays, names, bc_names, stages)
  unroll = p.primal_unroll if mode == "main" else p.unroll

  def body(*refs_in, **scratch_refs):
    refs = dict(zip(in_names + out_names, refs_in))
    refs.update(scratch_refs)
    di, bi, si = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK, BLOCK)
    ring = _Ring(refs, names, bc_names, _groups_of(p, di), refs["bars"], stages, bi, di, cols)
    first = si * per
    count = jnp.minimum(per, nt - first) if whole else per
    min_count = nt - (ss - 1) * per if whole else per
    _prologue(count, min_count, stages, lambda i: ring.fetch(first + i, i))
    bias = _vec(refs["bias"].at[cols]) if p.has_bias else None
    dskip = _vec(refs["D"].at[cols]) if (main and p.has_d) else None
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_st)]
    zero = _full(0.0)
    if main:
      h0 = tuple(_vec(refs["enter"].at[bi, si, j, cols]) for j in range(n_st))
    else:
      h0 = tuple(zero for _ in range(n_st))

    def tile(k, carry):
      h, dsum = carry
      n = first + k
      slot = lax.rem(k, stages)
      if save:
        for j in range(n_st):
          refs["states"][bi, n, j, cols] = h[j]
      plgpu.barrier_wait(refs["bars"].at[slot])
      t_s = {name: refs[name + "_s"].at[slot] for name in names + bc_names}

      def token(t, h, dsum, resets):
        tok = n * TILE + t
        dt, _ = _delta(p, _vec(t_s["dt"].at[t]), bias, tok)
        uu = _vec(t_s["u"].at[t]).astype(_F32)
        dtu = dt * uu
        rb = _reset_bias(p, t_s, t) if resets else None
        h = list(h)
        y = dskip * uu if dskip is not None else None
        for j in range(n_st):
          h[j] = _decay(dt, a2[j], rb) * h[j] + dtu * t_s["B"][t, j]
          if main:
            y = h[j] * t_s["C"][t, j] if y is None else y + h[j] * t_s["C"][t, j]
        if main:
          if p.has_z:
            zz = _vec(t_s["z"].at[t]).astype(_F32)
            y = y * (zz * _sigmoid(zz))
          refs["y"][bi, tok, cols] = y.astype(refs["y"].dtype)
          return tuple(h), dsum
        return tuple(h), dsum + dt

      def tokens(resets, h, dsum):
        def group(i, carry):
          h, dsum = carry
          for r in range(unroll):
            h, dsum = token(i * unroll + r, h, dsum, resets)
          return h, dsum

        return lax.fori_loop(0, TILE // unroll, group, (h, dsum))

      if p.has_resets and p.reset_tiles:  # uniform over the block: every thread takes one branch
        carry = lax.cond(_tile_has_reset(t_s), functools.partial(tokens, True),
                         functools.partial(tokens, False), h, dsum)
      else:
        carry = tokens(p.has_resets, h, dsum)
      plgpu.commit_smem()  # every thread is done with this slot: refill it

      @pl.when(k + stages < count)
      def _():
        ring.fetch(n + stages, slot)

      return carry

    h, dsum = lax.fori_loop(0, count, tile, (h0, zero))
    if main:
      @pl.when(si == ss - 1)
      def _():
        for j in range(n_st):
          refs["last"][bi, j, cols] = h[j]
    else:
      for j in range(n_st):
        refs["hloc"][bi, si, j, cols] = h[j]
      refs["dsum"][bi, si, cols] = dsum

  call = _kernel(p, f"ssm_fwd_{mode}", body, (p.nblk, p.batch, grid_s),
                 out_type=tuple(out_type), scratch_types=scratch)
  return call(*(arrays[k] for k in in_names))


def _unbroken(p: _Plan, rb, segments: int):
  """``(batch, segments)`` float32: 1 where no reset falls inside a sequence segment, else 0."""
  per = -(-p.tiles // segments) * TILE
  rb = jnp.pad(rb[:, 0, :, 0], ((0, 0), (0, per * segments - p.lp)))
  return jnp.all(rb.reshape(p.batch, segments, per) == 0, axis=-1).astype(_F32)


def _fold(decay, loc, reverse: bool = False):
  """Chains segments ``h -> decay_s * h + loc_s`` from a zero state (last segment first with
  ``reverse``): the total ``(state, decay)`` of the run of segments, each (b, np, dp).

  This and the other chains over segments run ``_CHAIN_UNROLL`` steps per loop iteration: as an
  XLA while loop of one step each they cost 0.1-0.4 ms of per-iteration launches per call (H100,
  long-32k, 16-22 segments; results/bench_parallel/2026-11-26_h100x2_unrolled)."""
  def step(carry, xs):
    h, total = carry
    dec, lo = xs
    return (dec * h + lo, dec * total), None

  init = (jnp.zeros_like(loc[:, 0]), jnp.ones_like(decay[:, 0]))
  (h, total), _ = lax.scan(step, init, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(loc, 1, 0)),
                           reverse=reverse, unroll=_CHAIN_UNROLL)
  return h, total


def _forward(p: _Plan, arrays, h0t, save: bool):
  """y (b, Lp, dp), last state (b, np, dp), and the per-tile states if ``save``.

  With ``p.axis`` (one shard of a sequence split over devices) the pre-pass covers the whole
  shard; the shards' (end state from zero, total decay) pairs are chained across devices
  (:func:`ssmax.sharding.pass_state`) into the state entering this shard, from which the
  segments are chained as on one device. The main pass is then the one-device kernel's."""
  decay = hloc = None
  if p.axis is not None:
    hloc, dsum = _fwd_call(p, "local", arrays)  # (b, S, np, dp), (b, S, dp)
    decay = _decays(p, arrays, dsum, p.segments, slice(None))
    h_shard, d_shard = _fold(decay, hloc)
    h0t, _ = sharding.pass_state(d_shard, h_shard, p.axis, h0t)
    decay, hloc = decay[:, :-1], hloc[:, :-1]
  elif p.segments > 1:
    hloc, dsum = _fwd_call(p, "local", arrays)
    decay = _decays(p, arrays, dsum, p.segments, slice(None, -1))
  if p.segments > 1:
    def step(h, xs):
      dec, loc = xs
      return dec * h + loc, h

    last, enter = lax.scan(step, _varying_like(h0t, [hloc]),
                           (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(hloc, 1, 0)), unroll=_CHAIN_UNROLL)
    enter = jnp.concatenate([jnp.moveaxis(enter, 0, 1), last[:, None]], axis=1)
  else:
    enter = h0t[:, None]
  outs = _fwd_call(p, "main_save" if save else "main", dict(arrays, enter=enter))
  return outs if save else (*outs, None)


def _decays(p: _Plan, arrays, dsum, segments: int, which: slice):
  """exp(A ΣΔ) (b, S', np, dp) of the segments ``which`` of ``segments`` whose ΣΔ is ``dsum``;
  0 for a segment holding a reset (it passes nothing through it)."""
  decay = jnp.exp2(arrays["a2t"][None, None] * dsum[:, :, None, :])
  if p.has_resets:
    decay = decay * _unbroken(p, arrays["rb"], segments)[:, which, None, None]
  return decay


# ----------------------------------------------------------------------------------------------
# Backward.


def _lane_sums(p: _Plan, ref, vals):
  """Sums each of ``len(vals)`` (a multiple of 32) channel vectors over each warp's 32 channels;
  warp w's sum of value k lands in ``ref[w, k]``.

  A butterfly reduce-scatter: each halving step swaps half of the values with the lane
  ``offset`` away, so 32 values take 31 shuffles and lane l ends with the sum of value l."""
  if p.interpret:
    ref[...] = jnp.stack([v.reshape(4, 32).sum(axis=1) for v in vals], axis=1)
    return
  _lane_sums_mgpu(len(vals), 16)(ref, *vals)


def _pair_first(lo, hi):
  """The butterfly's first step (lanes 16 apart) for values k and k + 16, taken as soon as both
  exist: lane l keeps the pair sum of ``hi`` if bit 4 of l is set, else of ``lo``."""
  return _pair_first_mgpu()(lo, hi)


@functools.cache
def _pair_first_mgpu():
  from jax.experimental.mosaic.gpu import utils as mu
  import jax.experimental.mosaic.gpu as mgpu
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, vector

  @plgpu.inline_mgpu(arg_types=(_VEC, _VEC),
                     return_type=plgpu.ShapeDtypeStruct((BLOCK,), _F32, layout=_VEC))
  def pair_first(ctx, lo, hi):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    lane = arith.andi(mu.thread_idx(), mu.c(31, i32))
    upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, mu.c(16, i32)), mu.c(0, i32))
    pos = ir.DenseI64ArrayAttr.get([0])
    a = vector.extract(lo.registers.flat[0], dynamic_position=[], static_position=pos)
    b = vector.extract(hi.registers.flat[0], dynamic_position=[], static_position=pos)
    out = arith.addf(arith.select(upper, b, a), mu.shfl_bfly(arith.select(upper, a, b), 16))
    regs = lo.registers.copy()
    regs.flat[0] = vector.broadcast(lo.registers.flat[0].type, out)
    return mgpu.FragmentedArray(_registers=regs, _layout=lo.layout, _is_signed=None)

  return pair_first


@functools.cache
def _lane_sums_mgpu(m, first_offset):
  """``first_offset`` 16: the full butterfly over groups of 32 values; 8: the values already went
  through :func:`_pair_first` (16 values, lane l's result is value l % 16 of its half)."""
  from jax.experimental.mosaic.gpu import utils as mu
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, memref, vector

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) + (_VEC,) * m)
  def lane_sums(ctx, ref, *vals):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    idx = ir.IndexType.get()
    tid = mu.thread_idx()
    lane = arith.andi(tid, mu.c(31, i32))
    warp = arith.andi(arith.shrui(tid, mu.c(5, i32)), mu.c(3, i32))
    regs = [vector.extract(v.registers.flat[0], dynamic_position=[],
                           static_position=ir.DenseI64ArrayAttr.get([0])) for v in vals]
    group = 2 * first_offset
    for c0 in range(0, m, group):
      xs = regs[c0:c0 + group]
      off = first_offset
      while off:
        upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, mu.c(off, i32)), mu.c(0, i32))
        half = len(xs) // 2
        xs = [arith.addf(arith.select(upper, hi, lo),
                         mu.shfl_bfly(arith.select(upper, lo, hi), off))
              for lo, hi in zip(xs[:half], xs[half:])]
        off //= 2
      col = arith.addi(lane, mu.c(c0 * 32 // group, i32))
      memref.store(xs[0], ref, [arith.index_cast(idx, warp), arith.index_cast(idx, col)])

  return lane_sums


class _BackwardTile:
  """One backward tile ``n`` (shared tiles ``t_s``) for the states ``st`` (their A·log2(e) in
  ``a2``), what both backward kernels do with it: :meth:`park` (pass 1) and :meth:`history`
  recompute the forward, :meth:`adjoint` runs a token's adjoint step over the states and
  :meth:`finish` stores the token's dΔ, du and dz from the sums over all states."""

  def __init__(self, p: _Plan, refs, bi, cols, t_s, bias, n, a2, st, subs, zero):
    self.p, self.refs, self.bi, self.cols, self.t_s = p, refs, bi, cols, t_s
    self.bias, self.n, self.a2, self.st, self.subs, self.zero = bias, n, a2, st, subs, zero

  def inputs(self, t):
    """Δ, dΔ/draw and u of token ``t``."""
    dt, dsp = _delta(self.p, _vec(self.t_s["dt"].at[t]), self.bias, self.n * TILE + t)
    return dt, dsp, _vec(self.t_s["u"].at[t]).astype(_F32)

  def decays(self, t, dt):
    rb = _reset_bias(self.p, self.t_s, t)
    return [_decay(dt, a, rb) for a in self.a2]

  def advance(self, h, t, dec, dtu):
    return [dec[j] * h[j] + dtu * self.t_s["B"][t, s] for j, s in enumerate(self.st)]

  def park(self, h):
    """Pass 1: from the tile's entering states ``h``, the state entering every sub-tile, parked
    in shared memory (each thread its own column: no synchronisation)."""
    sub, nsub, subs = self.p.sub, TILE // self.p.sub, self.subs

    def step(q, h):
      h = list(h)
      for j in range(len(h)):
        subs[q, j, :] = h[j]
      for r in range(sub):
        t = q * sub + r
        dt, _, uu = self.inputs(t)
        h = self.advance(h, t, self.decays(t, dt), dt * uu)
      return tuple(h)

    h = lax.fori_loop(0, nsub - 1, step, h)
    for j in range(len(h)):
      subs[nsub - 1, j, :] = h[j]

  def history(self, q):
    """Sub-tile ``q``'s tokens in order: (Δ, dΔ/draw, u, Δu, entering states, decays) each, the
    states and decays recomputed into registers from the parked ones."""
    h = [_vec(self.subs.at[q, j]) for j in range(len(self.st))]
    hist = []
    for r in range(self.p.sub):
      t = q * self.p.sub + r
      dt, dsp, uu = self.inputs(t)
      dtu = dt * uu
      dec = self.decays(t, dt)
      hist.append((dt, dsp, uu, dtu, h, dec))
      if r + 1 < self.p.sub:
        h = self.advance(h, t, dec, dtu)
    return hist

  def adjoint(self, t, hist, g, da, dskip, products):
    """Token ``t`` (``hist``: its entry of :meth:`history`) back over the states: the cotangents
    ``g`` and the dA sums ``da`` (lists, one (128,) vector per state) are updated in place and each
    state's (dC, dB) products go to ``products(dc, db)``. Returns (dy, z, σ(z), the cotangent of
    the scan's output, ys = C·h over these states (+ D·u with ``dskip``), Σ g·B, Σ g·h·A·log2(e));
    z and σ(z) are None without the gate."""
    p, t_s, zero = self.p, self.t_s, self.zero
    dt, _, uu, dtu, hp, dec = hist
    dy = _vec(t_s["dy"].at[t]).astype(_F32)
    zz = sg = None
    if p.has_z:
      zz = _vec(t_s["z"].at[t]).astype(_F32)
      sg = _sigmoid(zz)
      dout = dy * (zz * sg)
    else:
      dout = dy
    ys = dskip * uu if dskip is not None else zero
    gb = zero
    gda = zero
    for j, s in enumerate(self.st):
      cj = t_s["C"][t, s]
      bj = t_s["B"][t, s]
      ht = dec[j] * hp[j] + dtu * bj
      ys = ys + ht * cj
      gg = g[j] + dout * cj
      products(ht * dout, gg * dtu)
      gb = gb + gg * bj
      g[j] = gg * dec[j]
      q = g[j] * hp[j]
      da[j] = da[j] + q * dt
      gda = gda + q * self.a2[j]
    return dy, zz, sg, dout, ys, gb, gda

  def finish(self, tok, hist, ddelta, du, ys, dy, zz, sg, dout, dskip, db, dd):
    """Stores token ``tok``'s dΔ, du and dz from the sums over all states (``ddelta`` before the
    softplus, ``du`` without the D skip, ``ys`` = C·h + D·u); returns the dbias and dD sums
    ``db, dd`` with this token's added."""
    p, refs, bi, cols = self.p, self.refs, self.bi, self.cols
    _, dsp, uu, _, _, _ = hist
    if dsp is not None:
      ddelta = ddelta * dsp
    if p.ragged:
      ddelta = ddelta * (tok < p.length).astype(_F32)
    db = db + ddelta
    if p.has_d:
      du = du + dskip * dout
      dd = dd + dout * uu
    refs["ddt"][bi, tok, cols] = ddelta.astype(refs["ddt"].dtype)
    refs["du"][bi, tok, cols] = du.astype(refs["du"].dtype)
    if p.has_z:
      dz = dy * ys * (sg * (1.0 + zz * (1.0 - sg)))
      refs["dz"][bi, tok, cols] = dz.astype(refs["dz"].dtype)
    return db, dd


@functools.partial(jax.jit, static_argnums=(0,))
def _bwd_local_call(p: _Plan, arrays):
  """Adjoint over segments 1..S-1 (0..S-1 with ``p.axis``) from a zero cotangent at their end:
  the cotangent of the state entering each (b, S', np, dp) and its ΣΔ (b, S', dp).

  One warpgroup of all the states, also with two backward warpgroups: a version splitting the
  states over two (as :func:`_bwd_call_wg2`) took 182 against 159 µs at 130m-train on an H200
  (results/bench_scan/2026-12-04_h200_wg2)."""
  n_st, nt, ss = p.state_pad, p.tiles, p.bwd_segments
  per = -(-nt // ss)
  skip = 0 if p.axis is not None else 1  # segment 0's pre-pass is needed only across devices
  names = ["dt", "dy"] + (["z"] if p.has_z else [])
  bc_names = ["C"] + (["rb"] if p.has_resets else [])
  in_names = names + bc_names + (["bias"] if p.has_bias else []) + ["a2t"]
  f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
  out_names = ["gloc", "dsum"]
  out_type = (f32(p.batch, ss - skip, n_st, p.dp), f32(p.batch, ss - skip, p.dp))
  stages = max(1, min(p.stages, per))
  scratch = _smem(p, arrays, names, bc_names, stages)

  def body(*refs_in, **scratch_refs):
    refs = dict(zip(in_names + out_names, refs_in))
    refs.update(scratch_refs)
    di, bi, si = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK, BLOCK)
    ring = _Ring(refs, names, bc_names, _groups_of(p, di), refs["bars"], stages, bi, di, cols)
    seg = si + skip
    last = jnp.minimum(seg * per + per, nt) - 1
    count = last + 1 - seg * per
    _prologue(count, nt - (ss - 1) * per, stages, lambda i: ring.fetch(last - i, i))
    bias = _vec(refs["bias"].at[cols]) if p.has_bias else None
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_st)]
    zero = _full(0.0)

    def tile(k, carry):
      n = last - k
      slot = lax.rem(k, stages)
      plgpu.barrier_wait(refs["bars"].at[slot])
      t_s = {name: refs[name + "_s"].at[slot] for name in names + bc_names}

      def token(t, carry):
        g, dsum = carry
        tok = n * TILE + t
        dt, _ = _delta(p, _vec(t_s["dt"].at[t]), bias, tok)
        dout = _vec(t_s["dy"].at[t]).astype(_F32)
        if p.has_z:
          zz = _vec(t_s["z"].at[t]).astype(_F32)
          dout = dout * (zz * _sigmoid(zz))
        rb = _reset_bias(p, t_s, t)
        g = tuple(_decay(dt, a2[j], rb) * (g[j] + dout * t_s["C"][t, j]) for j in range(n_st))
        return g, dsum + dt

      def group(i, carry):
        for r in range(p.unroll):
          carry = token(TILE - 1 - (i * p.unroll + r), carry)
        return carry

      carry = lax.fori_loop(0, TILE // p.unroll, group, carry)
      plgpu.commit_smem()

      @pl.when(k + stages < count)
      def _():
        ring.fetch(n - stages, slot)

      return carry

    g, dsum = lax.fori_loop(0, count, tile, (tuple(zero for _ in range(n_st)), zero))
    for j in range(n_st):
      refs["gloc"][bi, si, j, cols] = g[j]
    refs["dsum"][bi, si, cols] = dsum

  call = _kernel(p, "ssm_bwd_local", body, (p.nblk, p.batch, ss - skip), out_type=out_type,
                 scratch_types=scratch)
  return call(*(arrays[k] for k in in_names))


def _bwd_io(p: _Plan, arrays, dbc_shape):
  """The backward kernels' tiled inputs (``names``, ``bc_names``), all input and output names, and
  the output types; ``dbc_shape``: the dB/dC partial sums' shape after the batch, or ``None``
  where the kernel writes them over the saved states it has read (``states`` is then a mutable
  ref)."""
  names = ["dt", "u", "dy"] + (["z"] if p.has_z else [])
  bc_names = ["B", "C"] + (["rb"] if p.has_resets else [])
  in_names = (names + bc_names + (["bias"] if p.has_bias else []) + (["D"] if p.has_d else [])
              + ["a2t", "states", "gend"])
  f32 = lambda *s: jax.ShapeDtypeStruct(s, _F32)
  big = lambda k: jax.ShapeDtypeStruct((p.batch, p.lp, p.dp),
                                       _F32 if p.f32_out else arrays[k].dtype)
  ss, n_st = p.bwd_segments, p.state_pad
  dbc = [] if dbc_shape is None else ["dbc"]
  out_names = ["ddt", "du"] + (["dz"] if p.has_z else []) + dbc + ["dA", "dD", "dbias", "dh0"]
  out_type = [big("dt"), big("u")] + ([big("z")] if p.has_z else []) + [
      f32(p.batch, *dbc_shape) for _ in dbc] + [
      f32(p.batch, ss, n_st, p.dp), f32(p.batch, ss, p.dp), f32(p.batch, ss, p.dp),
      f32(p.batch, n_st, p.dp)]
  return names, bc_names, in_names, out_names, tuple(out_type)


def _bwd_outs(p: _Plan, outs, dbc=None):
  """A backward kernel's outputs as (ddt, du, dz or None, dbc, dA, dD, dbias, dh0); ``dbc``: where
  the kernel wrote its partial sums if not to an output."""
  outs = list(outs)
  dz = outs.pop(2) if p.has_z else None
  dbc = outs.pop(2) if dbc is None else dbc
  ddt, du, dA, dD, dbias, dh0 = outs
  return ddt, du, dz, dbc, dA, dD, dbias, dh0


@functools.partial(jax.jit, static_argnums=(0,))
def _bwd_call(p: _Plan, arrays):
  """The backward kernel: per segment, tiles last first, from the cotangent at the segment's end."""
  n_st, nt, ss, sub = p.state_pad, p.tiles, p.bwd_segments, p.sub
  per = -(-nt // ss)
  nsub = TILE // sub
  m = p.products
  names, bc_names, in_names, out_names, out_type = _bwd_io(p, arrays, (p.nblk, p.lp * m))
  stages = max(1, min(p.bwd_stages, per))
  scratch = _smem(p, arrays, names, bc_names, stages)
  scratch["subs"] = plgpu.SMEM((nsub, n_st, BLOCK), _F32)
  scratch["part"] = plgpu.SMEM((4, TILE * m), _F32)
  red_layout = plgpu.Layout.WG_STRIDED((TILE * m,), vec_size=4)

  def body(*refs_in, **scratch_refs):
    refs = dict(zip(in_names + out_names, refs_in))
    refs.update(scratch_refs)
    subs, part = refs["subs"], refs["part"]
    di, bi, si = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK, BLOCK)
    ring = _Ring(refs, names, bc_names, _groups_of(p, di), refs["bars"], stages, bi, di, cols)
    last = jnp.minimum(si * per + per, nt) - 1
    count = last + 1 - si * per
    _prologue(count, nt - (ss - 1) * per, stages, lambda i: ring.fetch(last - i, i))
    bias = _vec(refs["bias"].at[cols]) if p.has_bias else None
    dskip = _vec(refs["D"].at[cols]) if p.has_d else None
    a2 = [_vec(refs["a2t"].at[j, cols]) for j in range(n_st)]
    zero = _full(0.0)
    g0 = tuple(_vec(refs["gend"].at[bi, si, j, cols]) for j in range(n_st))
    acc0 = (tuple(zero for _ in range(n_st)), zero, zero)

    def tile(k, carry):
      n = last - k
      slot = lax.rem(k, stages)
      plgpu.barrier_wait(refs["bars"].at[slot])
      t_s = {name: refs[name + "_s"].at[slot] for name in names + bc_names}

      fwd = _BackwardTile(p, refs, bi, cols, t_s, bias, n, a2, range(n_st), subs, zero)
      fwd.park(tuple(_vec(refs["states"].at[bi, n, j, cols]) for j in range(n_st)))

      # Pass 2: sub-tiles last first; their states and decays in registers, then the adjoint.
      def pass2(i, carry):
        g, (da, dd, db) = carry
        g, da = list(g), list(da)
        s = nsub - 1 - i
        hist = fwd.history(s)
        for r in reversed(range(sub)):
          t = s * sub + r
          tok = n * TILE + t
          dt, _, uu, _, _, _ = hist[r]
          dc, dbp, firsts = [], [], []
          if p.early_pair and not p.interpret:  # halve the live products at once
            products = lambda a, b: firsts.append(_pair_first(a, b))
          else:
            products = lambda a, b: (dc.append(a), dbp.append(b))
          dy, zz, sg, dout, ys, gb, gda = fwd.adjoint(t, hist[r], g, da, dskip, products)
          row = part.at[:, pl.ds(t * m, m)]
          if firsts:
            _lane_sums_mgpu(16, 8)(row, *(firsts + [zero] * (16 - n_st)))
          else:
            pad = [zero] * (16 - n_st)
            _lane_sums(p, row, dc + pad + dbp + pad)
          db, dd = fwd.finish(tok, hist[r], gda * _LN2 + gb * uu, gb * dt, ys, dy, zz, sg, dout,
                              dskip, db, dd)
        return tuple(g), (tuple(da), dd, db)

      carry = lax.fori_loop(0, nsub, pass2, carry)
      plgpu.commit_smem()  # the slot is read and the warps' dB/dC rows are written

      @pl.when(k + stages < count)
      def _():
        ring.fetch(n - stages, slot)

      total = None
      for w in range(4):
        x = plgpu.load(part.at[w], layout=red_layout, optimized=False)
        total = x if total is None else total + x
      refs["dbc"][bi, di, pl.ds(n * (TILE * m), TILE * m)] = total
      plgpu.commit_smem()  # every thread has read the rows before the next tile rewrites them
      return carry

    g, (da, dd, db) = lax.fori_loop(0, count, tile, (g0, acc0))
    for j in range(n_st):
      refs["dA"][bi, si, j, cols] = da[j]
    refs["dD"][bi, si, cols] = dd
    refs["dbias"][bi, si, cols] = db

    @pl.when(si == 0)
    def _():
      for j in range(n_st):
        refs["dh0"][bi, j, cols] = g[j]

  call = _kernel(p, "ssm_bwd", body, (p.nblk, p.batch, ss), out_type=out_type,
                 scratch_types=scratch)
  return _bwd_outs(p, call(*(arrays[k] for k in in_names)))


def _dbc_in_place(states) -> bool:
  """Whether the two-warpgroup backward may write over ``states`` (not inside ``shard_map``)."""
  return not jax.typeof(states).mat.varying


@functools.partial(jax.jit, static_argnums=(0,))
def _bwd_call_wg2(p: _Plan, arrays):
  """The backward kernel with two warpgroups per CTA: warpgroup w owns states
  ``[w·h, w·h + h)`` (h = np / 2) of the same 128 channels, so each SM runs two warps per scheduler.

  Both walk the tiles of :func:`_bwd_call` (pass 1 parks their states' sub-tile entries, pass 2
  runs the adjoint) on the shared TMA ring, which warpgroup 0 refills once warpgroup 1 has released
  the slot (``consumed``). Per token the sums over states are split in two: warpgroup 1 writes its
  partial dΔ (before softplus), du and C·h into a shared slot per sub-tile (``full``); warpgroup 0
  adds its own, finishes dΔ, du, dz, dD, dbias and stores them, and frees the slot (``empty``). So
  warpgroup 1 runs up to one tile ahead and neither waits while the other is in another pass.
  Their dB/dC products (h of each per token, padded to 8) go through the butterfly a token pair at
  a time; a tile's partial sums, 16 per token (dC, then dB), are 4 rows of 128 per warpgroup,
  written over the warpgroup's first 4 rows of the tile's saved states, which it has read by then,
  so they take no memory of their own (the (b, blocks, 2, L·16) order is restored after the
  kernel). Inside ``shard_map`` (Mosaic GPU takes no mutable refs there) they go to a
  (b, tiles, 8, dp) output instead."""
  n_st, nt, ss, sub = p.state_pad, p.tiles, p.bwd_segments, p.sub
  half = n_st // 2
  assert half >= _DBC_ROWS, n_st
  in_place = _dbc_in_place(arrays["states"])
  rows_per_wg = half if in_place else _DBC_ROWS
  per = -(-nt // ss)
  nsub = TILE // sub
  names, bc_names, in_names, out_names, out_type = _bwd_io(
      p, arrays, None if in_place else (nt, 2 * _DBC_ROWS, p.dp))
  stages = max(1, min(p.bwd_stages, per))
  scratch = _smem(p, arrays, names, bc_names, stages)
  scratch["subs"] = plgpu.SMEM((2, nsub, half, BLOCK), _F32)
  scratch["part"] = plgpu.SMEM((2, 4, TILE * 16), _F32)
  scratch["xch"] = plgpu.SMEM((nsub, sub, _XCH, BLOCK), _F32)
  scratch["full"] = plgpu.Barrier(num_arrivals=1, num_barriers=nsub)
  scratch["empty"] = plgpu.Barrier(num_arrivals=1, num_barriers=nsub)
  scratch["consumed"] = plgpu.Barrier(num_arrivals=1, num_barriers=stages)

  def body(*refs_in, **scratch_refs):
    refs = dict(zip(in_names + out_names, refs_in))
    refs.update(scratch_refs)
    xch = refs["xch"]
    di, bi, si = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    cols = pl.ds(di * BLOCK, BLOCK)
    ring = _Ring(refs, names, bc_names, _groups_of(p, di), refs["bars"], stages, bi, di, cols)
    last = jnp.minimum(si * per + per, nt) - 1
    count = last + 1 - si * per
    bias = _vec(refs["bias"].at[cols]) if p.has_bias else None
    zero = _full(0.0)

    def run(w):  # warpgroup w, its states st
      st = [w * half + j for j in range(half)]
      subs, part = refs["subs"].at[w], refs["part"].at[w]
      if w == 0:
        _prologue(count, nt - (ss - 1) * per, stages, lambda i: ring.fetch(last - i, i))
      dskip = _vec(refs["D"].at[cols]) if (w == 0 and p.has_d) else None
      a2 = [_vec(refs["a2t"].at[s, cols]) for s in st]
      g0 = tuple(_vec(refs["gend"].at[bi, si, s, cols]) for s in st)
      acc0 = (tuple(zero for _ in st), zero, zero)

      def tile(k, carry):
        n = last - k
        slot = lax.rem(k, stages)
        plgpu.barrier_wait(refs["bars"].at[slot])
        t_s = {name: refs[name + "_s"].at[slot] for name in names + bc_names}

        fwd = _BackwardTile(p, refs, bi, cols, t_s, bias, n, a2, st, subs, zero)
        fwd.park(tuple(_vec(refs["states"].at[bi, n, s, cols]) for s in st))

        def pass2(i, carry):
          g, (da, dd, db) = carry
          g, da = list(g), list(da)
          q = nsub - 1 - i
          hist = fwd.history(q)
          if w == 0:
            plgpu.barrier_wait(refs["full"].at[q])
          else:
            pl.when(k > 0)(lambda: plgpu.barrier_wait(refs["empty"].at[q]))
          pad = [zero] * (8 - half)
          prods = [None] * sub
          for r in reversed(range(sub)):
            t = q * sub + r
            tok = n * TILE + t
            dt, _, uu, _, _, _ = hist[r]
            dc, dbp = [], []
            dy, zz, sg, dout, ys, gb, gda = fwd.adjoint(
                t, hist[r], g, da, dskip, lambda a, b: (dc.append(a), dbp.append(b)))
            prods[r] = dc + pad + dbp + pad
            if r % 2 == 0:  # the pair (t, t + 1): 32 products, one butterfly
              _lane_sums(p, part.at[:, pl.ds(t * 16, 32)], prods[r] + prods[r + 1])
            ddelta = gda * _LN2 + gb * uu
            du = gb * dt
            if w == 1:
              xch[q, r, 0, :] = ddelta
              xch[q, r, 1, :] = du
              xch[q, r, 2, :] = ys
              continue
            ddelta = ddelta + _vec(xch.at[q, r, 0])
            du = du + _vec(xch.at[q, r, 1])
            ys = ys + _vec(xch.at[q, r, 2])
            db, dd = fwd.finish(tok, hist[r], ddelta, du, ys, dy, zz, sg, dout, dskip, db, dd)
          if w == 1:
            plgpu.barrier_arrive(refs["full"].at[q])
          else:  # the last tile's slots are never refilled: nobody waits for them
            pl.when(k + 1 < count)(lambda: plgpu.barrier_arrive(refs["empty"].at[q]))
          return tuple(g), (tuple(da), dd, db)

        carry = lax.fori_loop(0, nsub, pass2, carry)
        plgpu.commit_smem()  # this warpgroup's dB/dC rows are written
        refill = k + stages < count
        if w == 1:
          pl.when(refill)(lambda: plgpu.barrier_arrive(refs["consumed"].at[slot]))
        else:
          @pl.when(refill)
          def _():
            plgpu.barrier_wait(refs["consumed"].at[slot])
            ring.fetch(n - stages, slot)

        rows = refs["states" if in_place else "dbc"]  # this tile's states were read in pass 1
        for r in range(_DBC_ROWS):
          row = [_vec(part.at[v, pl.ds(r * BLOCK, BLOCK)]) for v in range(4)]
          rows[bi, n, w * rows_per_wg + r, cols] = (row[0] + row[1]) + (row[2] + row[3])
        plgpu.commit_smem()  # every thread has read the rows before the next tile rewrites them
        return carry

      g, (da, dd, db) = lax.fori_loop(0, count, tile, (g0, acc0))
      for j, s in enumerate(st):
        refs["dA"][bi, si, s, cols] = da[j]
      if w == 0:
        refs["dD"][bi, si, cols] = dd
        refs["dbias"][bi, si, cols] = db

      @pl.when(si == 0)
      def _():
        for j, s in enumerate(st):
          refs["dh0"][bi, s, cols] = g[j]

    wg = lax.axis_index("wg")
    pl.when(wg == 0)(functools.partial(run, 0))
    pl.when(wg == 1)(functools.partial(run, 1))

  call = _kernel(p, "ssm_bwd_wg2", body, (p.nblk, p.batch, ss), out_type=out_type,
                 scratch_types=scratch, num_threads=2, thread_name="wg")
  if in_place:
    states = jax.new_ref(arrays["states"])
    outs = _bwd_outs(p, call(*(states if k == "states" else arrays[k] for k in in_names)),
                     jax.freeze(states))
  else:
    outs = _bwd_outs(p, call(*(arrays[k] for k in in_names)))
  rows = outs[3].reshape(p.batch, nt, 2, rows_per_wg, p.nblk, BLOCK)[:, :, :, :_DBC_ROWS]
  dbc = jnp.transpose(rows, (0, 4, 2, 1, 3, 5)).reshape(p.batch, p.nblk, 2, p.lp * 16)
  return (*outs[:3], dbc, *outs[4:])


def _backward(p: _Plan, arrays, states, dy, dlast_t):
  """With ``p.axis``: each shard's (cotangent entering it from a zero cotangent at its end,
  total decay) pair is chained across devices, last shard first, into the cotangent at this
  shard's end; ``dlast_t`` is this shard's share of the last state's cotangent."""
  arrays = dict(arrays, dy=dy)
  gend_last = dlast_t
  decay = gloc = None
  if p.axis is not None:
    gloc, dsum = _bwd_local_call(p, arrays)  # (b, S, np, dp), (b, S, dp)
    decay = _decays(p, arrays, dsum, p.bwd_segments, slice(None))
    g_shard, d_shard = _fold(decay, gloc, reverse=True)
    gend_last = _cotangent_at_end(d_shard, g_shard, dlast_t, p.axis)
    decay, gloc = decay[:, 1:], gloc[:, 1:]
  elif p.bwd_segments > 1:
    gloc, dsum = _bwd_local_call(p, arrays)
    decay = _decays(p, arrays, dsum, p.bwd_segments, slice(1, None))
  if p.bwd_segments > 1:
    def step(g, xs):  # g: cotangent at the end of segment s + 1
      dec, loc = xs
      return loc + dec * g, loc + dec * g

    _, before = lax.scan(step, _varying_like(gend_last, [gloc]),
                         (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(gloc, 1, 0)), reverse=True,
                         unroll=_CHAIN_UNROLL)
    gend = jnp.concatenate([jnp.moveaxis(before, 0, 1), gend_last[:, None]], axis=1)
  else:
    gend = gend_last[:, None]
  kernel = _bwd_call_wg2 if p.bwd_wg == 2 else _bwd_call
  outs = kernel(p, dict(arrays, states=states, gend=gend))
  if p.axis is not None:  # the initial state enters the first shard only
    first = lax.axis_index(p.axis) == 0
    outs = (*outs[:-1], jnp.where(first, outs[-1], jnp.zeros_like(outs[-1])))
  return outs


def _cotangent_at_end(decay, g_start, dlast, axis: str):
  """The cotangent of the state at the end of this shard: ``dlast`` plus what the later shards
  send back (shard j maps the cotangent at its end g to ``decay_j * g + g_start_j``, and ``g``
  there holds its own ``dlast_j``)."""
  after, _ = sharding.pass_state(decay, g_start + decay * dlast, axis, reverse=True)
  return dlast + after


# ----------------------------------------------------------------------------------------------
# Public entry points, custom VJP.


unsupported_reason = scan_unsupported_reason


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, *,
                   delta_softplus: bool = False, segment_ids=None, config: Config | None = None,
                   interpret: bool = False, sequence_axis: str | None = None):
  """Fused selective scan on canonical inputs.

  Args:
    u, delta: ``(batch, length, channels)``, float32/bfloat16/float16.
    A: ``(channels, state)`` float32 (real), state <= 256.
    B, C: ``(batch, length, groups, state)``; groups divide the channels contiguously.
    D, delta_bias: optional ``(channels,)`` float32.
    z: optional ``(batch, length, channels)`` gate.
    initial_state: optional ``(batch, channels, state)`` float32.
    delta_softplus: apply softplus to ``delta + delta_bias``.
    segment_ids: optional ``(batch, length)`` integers (packed documents): the state restarts
      from zero at every ``t >= 1`` whose id differs from ``t - 1``'s; ``initial_state`` feeds
      the first document only. In the kernels a reset is a decay of exactly 0 (``exp2`` of
      ``-inf``), so the recurrence and its gradients need no other change; a sequence segment
      holding a reset passes no state through it.
    config: optional :class:`Config`.
    interpret: run the kernels in Mosaic GPU's interpreter (CPU; for tests).
    sequence_axis: inside ``shard_map``, a mesh axis the length is split over (each shard passes
      its piece): the pre-passes cover whole shards, their totals are chained across devices
      (an ``all_gather`` of ``(batch, state, channels)`` each way), and each shard's main pass
      starts from its true entering state, so the work per device is the one-device kernel's on
      ``length / shards`` tokens. ``initial_state`` feeds the first shard.

  Returns:
    ``(y, last_state)``: ``y`` ``(batch, length, channels)`` in ``u.dtype``, ``last_state``
    ``(batch, channels, state)`` float32 (with ``sequence_axis``: the state after the last
    shard, on every shard). Differentiable in all nine arrays (custom VJP).
  """
  reason = unsupported_reason(u, delta, A, B, C, D, z, delta_bias, initial_state)
  if reason is not None:
    raise ValueError(f"the fused selective scan cannot take these inputs: {reason}")
  args = as_arrays(u, delta, A, B, C, D, z, delta_bias, initial_state)
  # Inside shard_map: every input typed as varying like the others, so that each cotangent has
  # its input's type (the cast's transpose sums a replicated input's gradient over the shards).
  u, delta, A, B, C, D, z, delta_bias, initial_state = _varying_like(args, args)
  config = config or Config()
  p = _make_plan(u, delta, z, B, C, A, D, delta_bias, delta_softplus, interpret, config,
                 resets=segment_ids is not None)
  p = dataclasses.replace(p, axis=sequence_axis, reset_tiles=config.reset_tiles,
                          lowering=config.lowering)
  rb = None if segment_ids is None else _reset_bias_array(p, segment_ids)
  scan = _scan_sliced if p.state_pad > MAX_STATE_PER_CALL else _scan
  y, last = scan(p, u, delta, A, B, C, D, z, delta_bias, initial_state, rb)
  if sequence_axis is not None:
    last = sharding.last_shard(last, sequence_axis)
  return y, last


def _reset_bias_array(p: _Plan, segment_ids):
  """``(batch, 1, Lp, 4)`` float32: in columns 0, 2, 3 -inf where a document starts
  (:func:`ssmax.sharding.segment_starts`: t >= 1 whose id differs from t - 1's; t = 0 too on a
  later shard under ``p.axis``), else 0; in column 1, 1 for every token of a tile that holds
  one, else 0."""
  ids = jnp.asarray(segment_ids)
  if ids.shape != (p.batch, p.length) or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be ({p.batch}, {p.length}) integers; got "
                     f"{ids.shape} {ids.dtype}")
  new = sharding.segment_starts(ids, p.axis)
  rb = jnp.where(new, -jnp.inf, 0.0).astype(_F32)
  rb = jnp.pad(rb, ((0, 0), (0, p.lp - p.length)))  # (b, Lp)
  has = jnp.any(rb.reshape(p.batch, p.tiles, TILE) != 0, axis=-1)  # (b, tiles)
  has = jnp.repeat(has.astype(_F32), TILE, axis=1)
  cols = [rb, has] + [rb] * (_RESET_COLS - 2)  # column 1: whether the token's tile holds a reset
  return jnp.stack(cols, axis=-1)[:, None]


def _prepare(p: _Plan, u, delta, A, B, C, D, z, delta_bias, initial_state, rb):
  a2 = jnp.maximum(A.astype(_F32) * _LOG2E, _NEG)  # -inf -> most negative finite: no 0·inf
  arrays = dict(dt=_chan(p, delta), u=_chan(p, u), B=_bc(p, B), C=_bc(p, C),
                a2t=_state_pad(p, a2[None])[0])
  if p.has_z:
    arrays["z"] = _chan(p, z)
  if p.has_d:
    arrays["D"] = _vec_pad(p, D)
  if p.has_bias:
    arrays["bias"] = _vec_pad(p, delta_bias)
  if rb is not None:
    arrays["rb"] = rb
  if initial_state is None:
    h0t = jnp.zeros((p.batch, p.state_pad, p.dp), _F32)
  else:
    h0t = _state_pad(p, initial_state)
  return arrays, h0t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(p: _Plan, u, delta, A, B, C, D, z, delta_bias, initial_state, rb):
  arrays, h0t = _prepare(p, u, delta, A, B, C, D, z, delta_bias, initial_state, rb)
  y, last, _ = _forward(p, arrays, h0t, save=False)
  return _unchan(p, y), _state_unpad(p, last)


def _scan_fwd(p: _Plan, u, delta, A, B, C, D, z, delta_bias, initial_state, rb):
  arrays, h0t = _prepare(p, u, delta, A, B, C, D, z, delta_bias, initial_state, rb)
  y, last, states = _forward(p, arrays, h0t, save=True)
  res = (arrays, states, A, D, delta_bias, initial_state, B, C)
  return (_unchan(p, y), _state_unpad(p, last)), res


def _scan_bwd(p: _Plan, res, cts):
  arrays, states, A, D, delta_bias, initial_state, B, C = res
  dy, dlast = cts
  dlast_t = _state_pad(p, dlast)
  ddt, du, dz, dbc, dA, dD, dbias, dh0 = _backward(
      p, arrays, states, _chan(p, dy.astype(arrays["u"].dtype)), dlast_t)
  dcs, dbs = _dbc_parts(p, dbc)
  return (*_finish_grads(p, du, ddt, dcs, dbs,
                        dA.sum(axis=(0, 1)), None if dD is None else dD.sum(axis=(0, 1)), dz,
                        dbias.sum(axis=(0, 1)), dh0, A, B, C, D, arrays.get("z"), delta_bias,
                        initial_state, arrays), None)  # no cotangent for the reset bias


def _dbc_parts(p: _Plan, dbc):
  """The backward kernel's dB/dC partial sums -> ``(dcs, dbs)``, each (b, nblk, Lp, np)."""
  if p.bwd_wg == 1:  # per token: dC at [0, np), dB at [16, 16 + np)
    dbc = dbc.reshape(p.batch, p.nblk, p.lp, p.products)
    return dbc[..., :p.state_pad], dbc[..., 16:16 + p.state_pad]
  # per warpgroup and token: its half of dC at [0, h), of dB at [8, 8 + h)
  h = p.state_pad // 2
  dbc = dbc.reshape(p.batch, p.nblk, 2, p.lp, 16)
  both = lambda lo: jnp.concatenate([dbc[:, :, 0, :, lo:lo + h], dbc[:, :, 1, :, lo:lo + h]], -1)
  return both(0), both(8)


def _finish_grads(p: _Plan, du, ddt, dcs, dbs, dA, dD, dz, dbias, dh0, A, B, C, D, z, delta_bias,
                  initial_state, arrays):
  """Kernel layouts -> the arguments' shapes and dtypes. ``dcs, dbs``: (b, nblk, Lp, np)
  per-block sums; ``dA`` (np, dp); ``dD, dbias`` (dp,); ``du, ddt, dz`` (b, Lp, dp)."""
  b = p.batch

  def per_group(x, groups, like):  # blocks -> fine groups -> the array's groups, (b, L, g, n)
    x = x.reshape(b, p.groups, p.bpg, p.lp, p.state_pad).sum(axis=2)[:, :, :p.length, :p.state]
    x = x.reshape(b, groups, p.groups // groups, p.length, p.state).sum(axis=2)
    return jnp.swapaxes(x, 1, 2).astype(like.dtype)

  cast = lambda x, like: None if like is None else x.astype(like.dtype)
  return (_unchan(p, du).astype(arrays["u"].dtype), _unchan(p, ddt).astype(arrays["dt"].dtype),
          cast(_state_unpad(p, dA[None])[0], A), per_group(dbs, p.groups_b, B),
          per_group(dcs, p.groups_c, C), None if D is None else cast(_unvec(p, dD), D),
          None if z is None else _unchan(p, dz).astype(z.dtype),
          None if delta_bias is None else cast(_unvec(p, dbias), delta_bias),
          None if initial_state is None else cast(_state_unpad(p, dh0), initial_state))


def _unvec(p: _Plan, x):
  return x.reshape(p.groups, p.group_channels_pad)[:, :p.group_channels].reshape(p.channels)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------------------------
# States above MAX_STATE_PER_CALL: slices of states. The recurrences of different states are
# independent given Δ and u; y, du and dΔ are sums over states, so each slice's kernels return
# float32 partial sums that XLA adds, and the D skip and the z gate are applied by XLA.


def _slices(p: _Plan):
  k = MAX_STATE_PER_CALL
  ps = dataclasses.replace(p, state=k, state_pad=k, has_d=False, has_z=False, f32_out=True)
  return ps, [slice(i, i + k) for i in range(0, p.state_pad, k)]


def _slice_arrays(arrays, sl):
  out = {k: v for k, v in arrays.items() if k not in ("z", "D")}
  out.update(a2t=arrays["a2t"][sl], B=arrays["B"][..., sl], C=arrays["C"][..., sl])
  return out


def _sliced_forward(p: _Plan, arrays, h0t, save):
  ps, sls = _slices(p)
  outs = [_forward(ps, _slice_arrays(arrays, sl), h0t[:, sl], save) for sl in sls]
  ys = sum(o[0] for o in outs)  # C·h, (b, Lp, dp) float32
  last = jnp.concatenate([o[1] for o in outs], axis=1)
  states = [o[2] for o in outs]
  u32 = arrays["u"].astype(_F32)
  y = ys + u32 * arrays["D"] if p.has_d else ys
  if p.has_z:
    z32 = arrays["z"].astype(_F32)
    y = y * (z32 * jax.nn.sigmoid(z32))
  return y.astype(arrays["u"].dtype), last, states, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_sliced(p: _Plan, u, delta, A, B, C, D, z, delta_bias, initial_state, rb):
  arrays, h0t = _prepare(p, u, delta, A, B, C, D, z, delta_bias, initial_state, rb)
  y, last, _, _ = _sliced_forward(p, arrays, h0t, save=False)
  return _unchan(p, y), _state_unpad(p, last)


def _scan_sliced_fwd(p: _Plan, u, delta, A, B, C, D, z, delta_bias, initial_state, rb):
  arrays, h0t = _prepare(p, u, delta, A, B, C, D, z, delta_bias, initial_state, rb)
  y, last, states, ys = _sliced_forward(p, arrays, h0t, save=True)
  res = (arrays, states, ys, A, D, delta_bias, initial_state, B, C)
  return (_unchan(p, y), _state_unpad(p, last)), res


def _scan_sliced_bwd(p: _Plan, res, cts):
  arrays, states, ys, A, D, delta_bias, initial_state, B, C = res
  dy, dlast = cts
  ps, sls = _slices(p)
  dy32 = _chan(p, dy.astype(_F32))
  u32 = arrays["u"].astype(_F32)
  dz = None
  dout = dy32
  if p.has_z:
    z32 = arrays["z"].astype(_F32)
    sg = jax.nn.sigmoid(z32)
    dout = dy32 * z32 * sg
    yprime = ys + u32 * arrays["D"] if p.has_d else ys
    dz = dy32 * yprime * sg * (1.0 + z32 * (1.0 - sg))
  dlast_t = _state_pad(p, dlast)
  outs = [_backward(ps, _slice_arrays(arrays, sl), st, dout, dlast_t[:, sl])
          for sl, st in zip(sls, states)]
  ddt = sum(o[0] for o in outs)
  du = sum(o[1] for o in outs)
  if p.has_d:
    du = du + dout * arrays["D"]
  parts = [_dbc_parts(ps, o[3]) for o in outs]  # per slice, (b, nblk, Lp, 16) each
  dcs = jnp.concatenate([c for c, _ in parts], axis=-1)
  dbs = jnp.concatenate([d for _, d in parts], axis=-1)
  dA = jnp.concatenate([o[4].sum(axis=(0, 1)) for o in outs], axis=0)
  dbias = sum(o[6].sum(axis=(0, 1)) for o in outs)
  dh0 = jnp.concatenate([o[7] for o in outs], axis=1)
  dD = jnp.sum(dout * u32, axis=(0, 1)) if p.has_d else None
  return (*_finish_grads(p, du, ddt, dcs, dbs, dA, dD, dz, dbias, dh0, A, B, C, D,
                        arrays.get("z"), delta_bias, initial_state, arrays), None)


_scan_sliced.defvjp(_scan_sliced_fwd, _scan_sliced_bwd)
