"""Mamba's mixer: in_proj -> causal depthwise conv1d -> SiLU -> x_proj -> (Δ, B, C) -> selective
scan -> gate with SiLU(z) -> out_proj (Mamba paper, Figure 3 and Algorithm 2).

Parameter names and initialisation follow the official ``mamba_ssm.modules.mamba_simple.Mamba``,
so a PyTorch checkpoint converts by renaming and transposing:

====================  =============================  ==========================================
ssmax                 shape                          mamba_ssm (PyTorch)
====================  =============================  ==========================================
``in_proj.kernel``    ``(d_model, 2 * d_inner)``     ``in_proj.weight.T``
``conv1d.kernel``     ``(d_conv, 1, d_inner)``       ``conv1d.weight`` ``(d_inner, 1, d_conv)``
                                                     transposed ``(2, 1, 0)``
``conv1d.bias``       ``(d_inner,)``                 ``conv1d.bias``
``x_proj.kernel``     ``(d_inner, dt_rank + 2N)``    ``x_proj.weight.T``
``dt_proj.kernel``    ``(dt_rank, d_inner)``         ``dt_proj.weight.T``
``dt_proj.bias``      ``(d_inner,)``                 ``dt_proj.bias``
``A_log``             ``(d_inner, N)``               ``A_log``
``D``                 ``(d_inner,)``                 ``D``
``out_proj.kernel``   ``(d_inner, d_model)``         ``out_proj.weight.T``
====================  =============================  ==========================================

``x_proj``'s output splits as ``[Δ (dt_rank), B (N), C (N)]`` and ``in_proj``'s as ``[x, z]``, as
in the official code. With ``ssm="s4d"`` the inner SSM is linear time-invariant instead: per-channel
learned Δ, A, B, C and D in an :class:`~ssmax.nn.S4DLayer` attribute ``s4d`` (S4D-Real init by
default); there is no ``x_proj``, ``dt_proj``, ``A_log`` or ``D`` and the SSM runs as an FFT
convolution with an :mod:`ssmax.lti` kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssmax import _checks, sharding
from ssmax.nn import init as inits
from ssmax.nn.config import MambaConfig
from ssmax.nn.dense import dense, dense_split, product
from ssmax.nn.s4 import S4DLayer
from ssmax.scan import segments, selective_scan, selective_state_update
from ssmax.scan.inputs import check_segment_ids


class MixerState(NamedTuple):
  """Recurrent state of one mixer, O(1) in the sequence length.

  Attributes:
    conv: ``(batch, d_conv, d_inner)`` the last ``d_conv`` inputs of the convolution, oldest first
      (zeros before the sequence starts), in the compute dtype; inside a decode loop, a ring
      (:meth:`MambaMixer.step`'s ``conv_slot``).
    ssm: ``(batch, d_inner, d_state)`` SSM state after the last token, float32; with ``ssm="s4d"``
      the :class:`S4DLayer`'s state ``(batch, d_inner, modes)`` (complex64 for a complex init).
  """

  conv: jax.Array
  ssm: jax.Array


class MambaMixer(nnx.Module):
  """The Mamba block's mixer (the official ``Mamba`` module), batch-major, configured by a
  :class:`MambaConfig` taken whole.

  Call it on ``(batch, length, d_model)``; ``step`` advances the recurrent state by one token.
  """

  def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
    """Builds the mixer of one block of a :class:`~ssmax.nn.MambaLM` with the official
    initialisation.

    The fields of ``config`` it reads (checked there): ``d_model``, ``d_state``, ``d_conv``,
    ``expand``, ``dt_rank``, the ``dt_*`` initialisation, ``conv_bias``, ``bias`` (``in_proj`` and
    ``out_proj``, initialised to zero), ``gated`` (False drops the ``z`` half of ``in_proj``),
    ``ssm`` and ``s4d_init``, ``n_layer`` (``out_proj``'s init is divided by ``sqrt(n_layer)``, the
    official LM's rescaling of residual branches), ``scan_backend``, ``sequence_axis`` (inside
    ``jax.shard_map`` the convolution takes its left context from the previous shard and the SSM
    passes its state across shards), ``dtype`` (compute) and ``param_dtype``.

    Args:
      config: a :class:`MambaConfig`.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """
    if not isinstance(config, MambaConfig):
      raise ValueError(f"config must be a MambaConfig; got {type(config).__name__}")
    c = config
    self.d_model = d_model = c.d_model
    self.d_state = d_state = c.d_state
    self.d_conv = d_conv = c.d_conv
    self.d_inner = d_inner = c.d_inner
    self.dt_rank = dt_rank = c.resolved_dt_rank
    self.gated = c.gated
    self.ssm = c.ssm
    self.scan_backend = c.scan_backend
    self.sequence_axis = c.sequence_axis
    self.dtype = c.dtype
    linear = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

    self.in_proj = nnx.Linear(d_model, (2 if c.gated else 1) * d_inner, use_bias=c.bias,
                              kernel_init=inits.torch_uniform(d_model),
                              bias_init=jax.nn.initializers.zeros, **linear)
    # Depthwise: kernel (d_conv, 1, d_inner); the left context is concatenated by hand so that a
    # carried conv state and zero padding take the same path.
    self.conv1d = nnx.Conv(d_inner, d_inner, kernel_size=(d_conv,), feature_group_count=d_inner,
                           padding="VALID", use_bias=c.conv_bias,
                           kernel_init=inits.torch_uniform(d_conv),
                           bias_init=inits.torch_uniform(d_conv), **linear)
    if c.ssm == "selective":
      self.x_proj = nnx.Linear(d_inner, dt_rank + 2 * d_state, use_bias=False,
                               kernel_init=inits.torch_uniform(d_inner), **linear)
      dt_std = dt_rank**-0.5 * c.dt_scale
      dt_kernel_init = (jax.nn.initializers.constant(dt_std) if c.dt_init == "constant"
                        else inits.torch_uniform(1, dt_std))
      self.dt_proj = nnx.Linear(dt_rank, d_inner, use_bias=True, kernel_init=dt_kernel_init,
                                bias_init=inits.mamba_dt_bias(c.dt_min, c.dt_max, c.dt_init_floor),
                                **linear)
      self.A_log = nnx.Param(inits.mamba_A_log(d_inner, d_state, c.param_dtype))
      self.D = nnx.Param(jnp.ones((d_inner,), c.param_dtype))
      self.state_shape = (d_inner, d_state)
      self.state_dtype = jnp.float32
    else:
      # Δ, A, B, C, D are the S4D layer's own, not functions of the input.
      self.s4d = S4DLayer(d_inner, d_state=d_state, init=c.s4d_init, dt_min=c.dt_min,
                          dt_max=c.dt_max, sequence_axis=c.sequence_axis,
                          param_dtype=c.param_dtype, rngs=rngs)
      self.state_shape = (d_inner, self.s4d.modes)
      self.state_dtype = self.s4d.init_state(1).dtype
    self.out_proj = nnx.Linear(d_inner, d_model, use_bias=c.bias,
                               kernel_init=inits.torch_uniform(d_inner, c.n_layer**-0.5),
                               bias_init=jax.nn.initializers.zeros, **linear)

  # --------------------------------------------------------------------------------------------

  def init_state(self, batch: int) -> MixerState:
    """Zero state: ``conv`` ``(batch, d_conv, d_inner)``, ``ssm`` ``(batch, d_inner, d_state)``."""
    _checks.positive_int("batch", batch)
    return MixerState(jnp.zeros((batch, self.d_conv, self.d_inner), self.dtype),
                      jnp.zeros((batch,) + self.state_shape, self.state_dtype))

  def __call__(self, x: jax.Array, state: MixerState | None = None, *,
               return_state: bool = False, segment_ids: jax.Array | None = None):
    """Parallel (training / prefill) mode.

    Args:
      x: ``(batch, length, d_model)`` floating input, ``length >= 1``.
      state: optional :class:`MixerState` to continue from (zero state if None).
      return_state: also return the state after the last token.
      segment_ids: optional ``(batch, length)`` integer ids of packed documents (see
        :func:`ssmax.selective_scan`): a new document starts where the id changes, and nothing
        crosses into it: the causal convolution only reads inputs of the same document (its
        window is masked per position) and the SSM state restarts from zero. ``state`` is the
        state before each row's first document; the returned state is that after its last
        document (its conv part holds only that document's inputs).

    Returns:
      ``y`` ``(batch, length, d_model)`` in the compute dtype, or ``(y, state)``.
    """
    _checks.rank("x", x, 3, "(batch, length, d_model)")
    _checks.floating("x", x)
    b, l, _ = x.shape
    _checks.shape("x", x, (None, None, self.d_model), "(batch, length, d_model)")
    if l < 1:
      raise ValueError(f"x must have length >= 1 along axis 1; got shape {x.shape}")
    if segment_ids is not None:
      check_segment_ids(segment_ids, (b, l), like="x")
    fresh = state is None  # no carried state: no initial SSM state either (cheaper for the scan)
    state = self._check_state(state, b)

    xs, z = self._in_proj(x)
    left = state.conv[:, 1:].astype(xs.dtype)  # the d_conv - 1 inputs before this piece
    if self.sequence_axis is not None and self.d_conv > 1:
      left = sharding.sequence_halo(xs, self.d_conv - 1, self.sequence_axis, first=left)
    history = jnp.concatenate([left, xs], axis=1)
    window = None
    if segment_ids is not None:
      before = segments.left_ids(segment_ids, self.d_conv - 1, self.sequence_axis)
      window = segments.window_mask(segment_ids, self.d_conv, before)  # (b, l, d_conv)
    u = jax.nn.silu(self._conv(history, window))  # (b, l, d_inner)
    h0 = None if fresh else state.ssm
    if self.ssm == "selective":
      dt, B, C = self._x_proj(u)
      y = selective_scan(u, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)), B, C,
                         D=self.D[...], z=z, delta_bias=self.dt_proj.bias[...],
                         delta_softplus=True, initial_state=h0, return_last_state=return_state,
                         backend=self.scan_backend, sequence_axis=self.sequence_axis,
                         segment_ids=segment_ids)
    else:
      y = self.s4d(u, h0, return_state=return_state, segment_ids=segment_ids)
    y, last = y if return_state else (y, None)
    if self.ssm == "s4d" and z is not None:
      y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    out = self.out_proj(y.astype(self.dtype))
    if not return_state:
      return out
    conv = history[:, -self.d_conv:].astype(self.dtype)
    if segment_ids is not None:  # only the last document's inputs carry on
      conv = conv * window[:, -1, :, None].astype(conv.dtype)
    if self.sequence_axis is not None:
      conv = sharding.last_shard(conv, self.sequence_axis)
    return out, MixerState(conv, last)

  def step(self, state: MixerState, x: jax.Array, *, conv_slot: jax.Array | int | None = None):
    """Recurrent mode: one token, O(1) in the sequence length.

    The SSM part is one :func:`ssmax.selective_state_update` with the mixer's ``scan_backend``:
    the fused Pallas step kernel with ``"pallas"``, plain JAX otherwise (``"auto"`` included: it
    was the faster on an H100). At batch 1 the projections run as two-row matrix products
    (:func:`ssmax.nn.dense.dense`).

    Args:
      state: :class:`MixerState` for ``batch`` sequences.
      x: ``(batch, d_model)`` the current token's input.
      conv_slot: None (default): ``state.conv`` holds the last ``d_conv`` inputs oldest first, and
        the step shifts them by one. An int32 scalar in ``[0, d_conv)``: ``state.conv`` is a ring
        whose slot ``conv_slot`` holds the oldest input (the rest follow it cyclically), and this
        token's input overwrites that slot. A decode loop that starts from a state in the default
        layout passes ``t % d_conv`` at its step ``t`` (from 0); before every step with
        ``t % d_conv == 0`` the state is in the default layout again. Results are bit-identical
        to the default's. Why: a shift reads the
        buffer it writes, so inside a loop XLA writes it elsewhere and copies it back (one more
        kernel a layer and step), while the ring's one-slot write is done in place.

    Returns:
      ``(y, state)`` with ``y`` ``(batch, d_model)`` in the compute dtype.
    """
    _checks.rank("x", x, 2, "(batch, d_model)")
    _checks.floating("x", x)
    _checks.shape("x", x, (None, self.d_model), "(batch, d_model)")
    state = self._check_state(state, x.shape[0], required=True)

    xs, z = self._in_proj(x)
    new = xs[:, None, :].astype(state.conv.dtype)
    if conv_slot is None:
      conv = window = jnp.concatenate([state.conv[:, 1:], new], axis=1)
    else:
      conv_slot = self._check_conv_slot(conv_slot)
      conv = jax.lax.dynamic_update_slice_in_dim(state.conv, new, conv_slot, axis=1)
      window = jnp.roll(conv, -(conv_slot + 1), axis=1)  # oldest first, as the default layout
    u = jnp.einsum("bkd,kd->bd", window.astype(self.dtype), self.conv1d.kernel[...][:, 0, :]
                   .astype(self.dtype))
    if self.conv1d.bias is not None:
      u = u + self.conv1d.bias[...].astype(self.dtype)
    u = jax.nn.silu(u)
    if self.ssm == "selective":
      # Δ's projection in the compute dtype, as the parallel mode's (_x_proj): a float32
      # projection inside the step took 3-7% longer per decode step on an H200.
      x_dbl = dense(self.x_proj, u)
      r, n = self.dt_rank, self.d_state
      dt = product(x_dbl[:, :r], self.dt_proj.kernel[...])
      y, h = selective_state_update(
          state.ssm, u, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)),
          x_dbl[:, r:r + n], x_dbl[:, r + n:], D=self.D[...], z=z,
          delta_bias=self.dt_proj.bias[...], delta_softplus=True, backend=self.scan_backend)
    else:
      y, h = self.s4d.step(state.ssm, u.astype(jnp.float32))
      if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return dense(self.out_proj, y.astype(self.dtype)), MixerState(conv, h)

  # --------------------------------------------------------------------------------------------

  def _check_conv_slot(self, slot) -> jax.Array:
    dtype = _checks.dtype_of(slot) if not isinstance(slot, int) else None
    if (isinstance(slot, bool) or jnp.ndim(slot) != 0
        or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer))):
      raise ValueError(f"conv_slot must be an integer scalar in [0, d_conv={self.d_conv}); got "
                       f"{slot!r}")
    if not isinstance(slot, jax.core.Tracer) and not 0 <= int(slot) < self.d_conv:
      raise ValueError(f"conv_slot must lie in [0, d_conv={self.d_conv}); got {int(slot)}")
    return jnp.asarray(slot, jnp.int32)

  def _check_state(self, state, batch: int, required: bool = False) -> MixerState:
    if state is None:
      if required:
        raise ValueError("state must be a MixerState; got None (use init_state(batch))")
      return self.init_state(batch)
    if not isinstance(state, MixerState):
      raise ValueError(f"state must be a MixerState; got {type(state).__name__}")
    _checks.shape("state.conv", state.conv, (batch, self.d_conv, self.d_inner),
                  "(batch, d_conv, d_inner)")
    _checks.shape("state.ssm", state.ssm, (batch,) + self.state_shape,
                  "(batch, d_inner, d_state)")
    return state

  def _conv(self, history, window=None):
    """The depthwise causal convolution as ``d_conv`` shifted multiply-adds (one fusion with the
    SiLU after it; with XLA's grouped convolution of ``d_inner`` groups the 130M training step took
    135.4 ms on an H100, with these 86.0 ms). ``history`` ``(b, l + d_conv - 1, d_inner)``;
    ``window`` ``(b, l, d_conv)`` bool or None: which inputs of each output's window count (packed
    documents).
    Returns ``(b, l, d_inner)`` in the compute dtype, summed in float32."""
    l = history.shape[1] - self.d_conv + 1
    f32 = jnp.promote_types(self.dtype, jnp.float32)
    kernel = self.conv1d.kernel[...][:, 0, :].astype(self.dtype).astype(f32)  # (d_conv, d_inner)
    history = history.astype(self.dtype).astype(f32)
    tap = lambda j: kernel[j] if window is None else jnp.where(window[..., j:j + 1], kernel[j], 0)
    u = sum(history[:, j:j + l] * tap(j) for j in range(self.d_conv))
    if self.conv1d.bias is not None:
      u = u + self.conv1d.bias[...].astype(self.dtype).astype(f32)
    return u.astype(self.dtype)

  def _in_proj(self, x):
    if not self.gated:
      return dense(self.in_proj, x), None
    return dense_split(self.in_proj, x, (self.d_inner, self.d_inner))

  def _x_proj(self, u):
    """``u`` ``(b, l, d_inner)`` -> Δ before bias ``(b, l, d_inner)``, B, C ``(b, l, N)``."""
    x_dbl = self.x_proj(u)
    r, n = self.dt_rank, self.d_state
    dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    # dt_proj without its bias: the bias goes to the scan as delta_bias, inside the softplus.
    dt = jnp.dot(dt_low, self.dt_proj.kernel[...].astype(dt_low.dtype))
    return dt, B, C
