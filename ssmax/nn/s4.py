"""S4D and S4 layers: ``H`` independent single-input SSMs, one per channel, run as a convolution.

Each layer has two views with one set of parameters (S4 paper, Section 2):

* convolution (training): discretise, build the kernel ``K (L, H)`` with :mod:`ssmax.lti`, and
  ``y = causal_conv(u, K) + D u`` by FFT;
* recurrence (generation): ``x' = Ab x + Bb u_t``, ``y_t = Re(C x') + D u_t`` per channel.

Packed documents (``segment_ids``) run the recurrence in parallel mode, since a convolution
kernel would reach across documents: S4D as ``lax.associative_scan``, S4 (dense ``Ab``) as
``lax.scan``; the state restarts from zero wherever the id changes.

Complex parameters are stored as real pairs (``*_re``/``*_im``, or ``A_log``/``A_im`` for the
diagonal ``A = -exp(A_log) + i A_im``) so that optimisers see real arrays. ``Δ`` is per channel,
``dt = exp(log_dt)`` initialised log-uniform in ``[dt_min, dt_max]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ssmax import _checks, discretize, hippo, lti, sharding
from ssmax.nn import init as inits
from ssmax.nn.config import S4D_INITS, check_dt_range
from ssmax.scan import segments
from ssmax.scan.inputs import check_segment_ids

# One SISO function of lti over the channels (and, for step, over the batch first).
_per_channel = lambda f: jax.vmap(f, in_axes=(0, 0, 0))
_kernels = jax.vmap(lti.kernel, in_axes=(0, 0, 0, None), out_axes=1)  # -> (L, H)
_kernels_dplr = jax.vmap(lti.kernel_dplr, in_axes=(0, 0, 0, 0, 0, None), out_axes=1)
_steps = jax.vmap(jax.vmap(lti.step, in_axes=(0, 0, 0, 0, 0)),  # channels
                  in_axes=(None, None, None, 0, 0))  # batch


def _check_u(u, channels):
  _checks.rank("u", u, 3, "(batch, length, channels)")
  _checks.floating("u", u)
  _checks.shape("u", u, (None, None, channels), "(batch, length, channels)")
  if u.shape[1] < 1:
    raise ValueError(f"u must have length >= 1 along axis 1; got shape {u.shape}")


def _check_step(state, u_t, state_shape):
  _checks.rank("u_t", u_t, 2, "(batch, channels)")
  _checks.floating("u_t", u_t)
  _checks.shape("u_t", u_t, (None, state_shape[0]), "(batch, channels)")
  _checks.shape("state", state, (u_t.shape[0],) + state_shape, "(batch, channels, modes)")


def _complex_normal(key, shape, dtype):
  """Circular complex normal with ``E|z|^2 = 1``, as real and imaginary parts."""
  re, im = jax.random.normal(key, (2,) + shape, dtype) * jnp.sqrt(0.5).astype(dtype)
  return re, im


class S4DLayer(nnx.Module):
  """S4D: a diagonal SSM per channel with ZOH discretisation (Gu et al. 2022, "S4D").

  ``d_state`` counts states as the S4D paper does: a complex init (``"lin"``, ``"inv"``) keeps
  ``d_state // 2`` modes whose conjugates are implicit, a real init (``"real"``) keeps ``d_state``
  real modes. The reference's ``2 Re(C x)`` over half the modes is ``Re(C x)`` here with ``C``
  initialised at twice its scale.

  Parameters: ``log_dt (H,)``, ``A_log (H, M)`` and (complex) ``A_im (H, M)``, ``B_re``/``B_im``
  ``(H, M)`` initialised to one, ``C_re``/``C_im`` ``(H, M)``, ``D (H,)``; ``M`` is the number of
  modes. Recurrent state ``(batch, H, M)``, complex64 for complex inits else float32.
  """

  def __init__(self, d_model: int, *, d_state: int = 64, init: str = "lin",
               dt_min: float = 0.001, dt_max: float = 0.1, sequence_axis: str | None = None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Builds the layer.

    Args:
      d_model: number of channels ``H``.
      d_state: state size ``N`` (even for complex inits).
      init: ``"lin"`` (S4D-Lin), ``"inv"`` (S4D-Inv) or ``"real"`` (S4D-Real).
      dt_min, dt_max: range of the log-uniform ``dt`` init.
      sequence_axis: mesh axis the length is split over, when called inside ``jax.shard_map``:
        each shard convolves its piece and the state entering it is passed from the shards
        before (:func:`ssmax.sharding.pass_state`). None: whole sequences.
      param_dtype: dtype of the real parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_state", d_state)
    _checks.one_of("init", init, S4D_INITS)
    check_dt_range(dt_min, dt_max)
    self.complex = init != "real"
    self.sequence_axis = sequence_axis
    if self.complex and d_state % 2:
      raise ValueError(f"d_state must be even for the complex init {init!r}; got {d_state}")
    self.d_model = d_model
    self.d_state = d_state
    self.modes = modes = d_state // 2 if self.complex else d_state
    A = {"lin": hippo.s4d_lin, "inv": hippo.s4d_inv, "real": hippo.s4d_real}[init](modes)
    tile = lambda a: jnp.broadcast_to(a, (d_model, modes)).astype(param_dtype)
    self.log_dt = nnx.Param(jnp.log(inits.log_uniform(rngs.params(), (d_model,), dt_min, dt_max))
                            .astype(param_dtype))
    self.A_log = nnx.Param(tile(jnp.log(-jnp.real(A))))
    self.B_re = nnx.Param(tile(1.0))
    if self.complex:
      self.A_im = nnx.Param(tile(jnp.imag(A)))
      self.B_im = nnx.Param(tile(0.0))
      c_re, c_im = _complex_normal(rngs.params(), (d_model, modes), param_dtype)
      self.C_re, self.C_im = nnx.Param(2 * c_re), nnx.Param(2 * c_im)
    else:
      self.C_re = nnx.Param(jax.random.normal(rngs.params(), (d_model, modes), param_dtype))
    self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,), param_dtype))

  def ssm(self):
    """Continuous parameters ``A, B, C`` ``(H, M)`` and ``dt`` ``(H,)``, float32 / complex64."""
    f32 = lambda p: p[...].astype(jnp.float32)
    A = -jnp.exp(f32(self.A_log))
    dt = jnp.exp(f32(self.log_dt))
    if not self.complex:
      return A, f32(self.B_re), f32(self.C_re), dt
    cplx = lambda re, im: jax.lax.complex(f32(re), f32(im))
    return (jax.lax.complex(A, f32(self.A_im)), cplx(self.B_re, self.B_im),
            cplx(self.C_re, self.C_im), dt)

  def discrete(self):
    """ZOH-discretised ``Ab, Bb`` and ``C``, each ``(H, M)``."""
    A, B, C, dt = self.ssm()
    Ab, Bb = _per_channel(discretize.zoh)(A, B, dt)
    return Ab, Bb, C

  def kernel(self, length: int) -> jax.Array:
    """Convolution kernel ``K (length, H)``, ``K[k, h] = Re(C_h Ab_h^k Bb_h)``."""
    _checks.positive_int("length", length)
    return _kernels(*self.discrete(), length)

  def init_state(self, batch: int) -> jax.Array:
    """Zero state ``(batch, H, M)``."""
    _checks.positive_int("batch", batch)
    return jnp.zeros((batch, self.d_model, self.modes),
                     jnp.complex64 if self.complex else jnp.float32)

  def __call__(self, u: jax.Array, state: jax.Array | None = None, *,
               return_state: bool = False, segment_ids: jax.Array | None = None):
    """Convolution mode (the recurrence, as a parallel scan, with ``segment_ids``).

    Args:
      u: ``(batch, length, H)`` floating input.
      state: optional ``(batch, H, M)`` state before the first step (zero if None).
      return_state: also return the state after the last step.
      segment_ids: optional ``(batch, length)`` integer ids of packed documents: the state
        restarts from zero wherever the id changes (``state`` is that before each row's first
        document; the returned state is that after its last). A convolution kernel would reach
        across documents, so the layer then runs its recurrence instead, as
        ``lax.associative_scan`` over ``(Ab, Bb u_t)`` pairs with ``Ab`` replaced by 0 at each
        document's first step: ``O(length * H * M)`` memory and ``O(log length)`` depth.

    Returns:
      ``y (batch, length, H)`` in ``u.dtype``, or ``(y, last_state)``.
    """
    _check_u(u, self.d_model)
    b, length, _ = u.shape
    if state is not None:
      _checks.shape("state", state, (b, self.d_model, self.modes), "(batch, channels, modes)")
    if segment_ids is not None:
      check_segment_ids(segment_ids, (b, length))
      return self._packed(u, state, return_state, segment_ids)
    Ab, Bb, C = self.discrete()
    u32 = u.astype(jnp.float32)
    y = lti.causal_conv(u32, _kernels(Ab, Bb, C, length)) + u32 * self.D[...].astype(jnp.float32)
    if state is None and not return_state and self.sequence_axis is None:
      return y.astype(u.dtype)
    # Ab^k for k = 1 .. length, (length, H, M): the initial state's echo and the last state.
    powers = jnp.cumprod(jnp.broadcast_to(Ab, (length,) + Ab.shape), axis=0)
    h0 = self.init_state(b) if state is None else state.astype(self.init_state(1).dtype)
    back = jnp.concatenate([jnp.ones_like(Ab)[None], powers[:-1]])[::-1]  # Ab^(length-1-j)
    if self.sequence_axis is not None:
      # This piece ran from zero; the state entering it comes from the pieces before.
      local = Bb * jnp.einsum("lhm,blh->bhm", back, u32.astype(back.dtype))
      h0, last = sharding.pass_state(jnp.broadcast_to(powers[-1], local.shape), local,
                                     self.sequence_axis, h0)
    y = y + jnp.real(jnp.einsum("lhm,bhm->blh", C * powers, h0))
    if not return_state:
      return y.astype(u.dtype)
    if self.sequence_axis is None:
      last = powers[-1] * h0 + Bb * jnp.einsum("lhm,blh->bhm", back, u32.astype(back.dtype))
    return y.astype(u.dtype), last.astype(h0.dtype)

  def _packed(self, u, state, return_state, segment_ids):
    """The recurrence with resets at document starts; under ``sequence_axis`` each shard scans
    its piece from zero and the state entering it (cut at its first boundary) is added after."""
    Ab, Bb, C = self.discrete()
    u32 = u.astype(jnp.float32)
    cdt = self.init_state(1).dtype
    resets = sharding.segment_starts(segment_ids, self.sequence_axis)
    keep = jnp.where(resets, 0.0, 1.0)
    decay = Ab[None, None] * keep[..., None, None].astype(Ab.dtype)  # (b, l, H, M)
    drive = Bb * u32[..., None].astype(Bb.dtype)
    h0 = None if state is None else state.astype(cdt)
    if h0 is not None and self.sequence_axis is None:
      drive = drive.at[:, 0].add(decay[:, 0] * h0)
    _, h = lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (decay, drive),
                                axis=1)
    y = jnp.real(jnp.sum(C * h, axis=-1)) + u32 * self.D[...].astype(jnp.float32)
    last = h[:, -1]
    if self.sequence_axis is not None:
      reach = (jnp.cumsum(resets, axis=1) == 0).astype(jnp.float32)  # before the first boundary
      powers = jnp.cumprod(jnp.broadcast_to(Ab, (u.shape[1],) + Ab.shape), axis=0)  # Ab^(t+1)
      decay_total = powers[-1] * reach[:, -1, None, None].astype(Ab.dtype)
      h0 = jnp.zeros_like(last) if h0 is None else h0
      h_in, last = sharding.pass_state(decay_total, last, self.sequence_axis, h0)
      y = y + jnp.real(jnp.einsum("lhm,bhm->blh", C * powers, h_in)) * reach[..., None]
    y = y.astype(u.dtype)
    return (y, last.astype(cdt)) if return_state else y

  def step(self, state: jax.Array, u_t: jax.Array):
    """Recurrent mode: ``state (batch, H, M)``, ``u_t (batch, H)`` -> ``(y_t (batch, H), state)``.
    """
    _check_step(state, u_t, (self.d_model, self.modes))
    Ab, Bb, C = self.discrete()
    u32 = u_t.astype(jnp.float32)
    y, state = _steps(Ab, Bb, C, state, u32)
    return (y + u32 * self.D[...].astype(jnp.float32)).astype(u_t.dtype), state


class S4Layer(nnx.Module):
  """S4: a diagonal-plus-low-rank SSM per channel from HiPPO-LegS (Gu et al. 2022, "S4").

  ``A = diag(Lambda) - P P^*`` in LegS's eigenbasis (:func:`ssmax.hippo.nplr`, all ``N`` modes),
  bilinear discretisation; the kernel is :func:`ssmax.lti.kernel_dplr` (Cauchy + Woodbury), the
  recurrence uses the dense ``(N, N)`` ``Ab``.

  Parameters ``(H, N)``: ``Lambda_re`` (clipped to ``<= -1e-4`` when used), ``Lambda_im``,
  ``P_re``/``P_im``, ``B_re``/``B_im`` (all from LegS), ``C_re``/``C_im`` (complex normal);
  ``log_dt (H,)``, ``D (H,)``. Recurrent state ``(batch, H, N)`` complex64.
  """

  def __init__(self, d_model: int, *, d_state: int = 64, dt_min: float = 0.001,
               dt_max: float = 0.1, sequence_axis: str | None = None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    """Builds the layer.

    Args:
      d_model: number of channels ``H``.
      d_state: state size ``N``.
      dt_min, dt_max: range of the log-uniform ``dt`` init.
      sequence_axis: mesh axis the length is split over, when called inside ``jax.shard_map``:
        the shards' pieces are gathered, convolved whole, and each keeps its own piece (with a
        dense ``Ab``, passing the state costs more than the gather). None: whole sequences.
      param_dtype: dtype of the real parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_state", d_state)
    check_dt_range(dt_min, dt_max)
    self.sequence_axis = sequence_axis
    self.d_model = d_model
    self.d_state = d_state
    Lam, P, B, _ = hippo.nplr("legs", d_state)
    tile = lambda a: nnx.Param(jnp.broadcast_to(a, (d_model, d_state)).astype(param_dtype))
    self.Lambda_re, self.Lambda_im = tile(jnp.real(Lam)), tile(jnp.imag(Lam))
    self.P_re, self.P_im = tile(jnp.real(P)), tile(jnp.imag(P))
    self.B_re, self.B_im = tile(jnp.real(B)), tile(jnp.imag(B))
    c_re, c_im = _complex_normal(rngs.params(), (d_model, d_state), param_dtype)
    self.C_re, self.C_im = nnx.Param(c_re), nnx.Param(c_im)
    self.log_dt = nnx.Param(jnp.log(inits.log_uniform(rngs.params(), (d_model,), dt_min, dt_max))
                            .astype(param_dtype))
    self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,), param_dtype))

  def ssm(self):
    """``Lambda, P, B, C`` ``(H, N)`` complex64 and ``dt (H,)`` float32."""
    f32 = lambda p: p[...].astype(jnp.float32)
    cplx = lambda re, im: jax.lax.complex(re, f32(im))
    Lam = cplx(jnp.minimum(f32(self.Lambda_re), -1e-4), self.Lambda_im)
    return (Lam, cplx(f32(self.P_re), self.P_im), cplx(f32(self.B_re), self.B_im),
            cplx(f32(self.C_re), self.C_im), jnp.exp(f32(self.log_dt)))

  def discrete(self):
    """Bilinear ``Ab (H, N, N)``, ``Bb (H, N)`` and ``C (H, N)``."""
    Lam, P, B, C, dt = self.ssm()
    Ab, Bb = jax.vmap(discretize.bilinear)(jax.vmap(hippo.dplr_matrix)(Lam, P), B, dt)
    return Ab, Bb, C

  def kernel(self, length: int) -> jax.Array:
    """Convolution kernel ``K (length, H)`` by the Cauchy/Woodbury route."""
    _checks.positive_int("length", length)
    return _kernels_dplr(*self.ssm(), length)

  def init_state(self, batch: int) -> jax.Array:
    """Zero state ``(batch, H, N)`` complex64."""
    _checks.positive_int("batch", batch)
    return jnp.zeros((batch, self.d_model, self.d_state), jnp.complex64)

  def __call__(self, u: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """Convolution mode: ``u (batch, length, H)`` -> ``y (batch, length, H)`` in ``u.dtype``.

    With ``segment_ids`` ``(batch, length)`` (packed documents; the state restarts from zero
    wherever the id changes) the layer runs its recurrence instead of the convolution, whose
    kernel would reach across documents: a ``lax.scan`` over time with the dense ``(N, N)``
    ``Ab``, zeroed at each document's first step. Under ``sequence_axis`` the pieces and ids are
    gathered and the whole sequence is scanned on every shard.
    """
    _check_u(u, self.d_model)
    u32 = u.astype(jnp.float32)
    if segment_ids is not None:
      check_segment_ids(segment_ids, u.shape[:2])
      if self.sequence_axis is None:
        y = self._recurrence(u32, segment_ids)
      else:
        y = sharding.local_piece(
            self._recurrence(sharding.gather_sequence(u32, self.sequence_axis),
                             sharding.gather_sequence(segment_ids, self.sequence_axis)),
            self.sequence_axis)
      return (y + u32 * self.D[...].astype(jnp.float32)).astype(u.dtype)
    # The kernel's inverse FFT waits for u (lti.after): FFTs at once can hang the CPU runtime.
    whole = u32 if self.sequence_axis is None else sharding.gather_sequence(
        u32, self.sequence_axis)
    y = lti.causal_conv(whole, _kernels_dplr(*lti.after(self.ssm(), whole), whole.shape[1]))
    if self.sequence_axis is not None:
      y = sharding.local_piece(y, self.sequence_axis)
    y = y + u32 * self.D[...].astype(jnp.float32)
    return y.astype(u.dtype)

  def _recurrence(self, u32, segment_ids):
    """``Re(C x_t)`` ``(batch, length, H)`` of ``x_t = keep_t Ab x_{t-1} + Bb u_t`` from zero,
    ``keep_t = 0`` where a document starts."""
    Ab, Bb, C = self.discrete()
    keep = jnp.where(segments.resets(segment_ids), 0.0, 1.0).astype(Ab.dtype)

    def body(h, inputs):
      u_t, keep_t = inputs  # (b, H), (b,)
      h = keep_t[:, None, None] * jnp.einsum("hij,bhj->bhi", Ab, h) + Bb * u_t[..., None]
      return h, jnp.real(jnp.sum(C * h, axis=-1))

    # Zeros typed like one step's input, so that under shard_map the carry varies as it does.
    h0 = jnp.zeros_like(Bb * u32[:, 0, :, None].astype(Ab.dtype))
    _, y = lax.scan(body, h0, (jnp.moveaxis(u32, 1, 0).astype(Ab.dtype), keep.T))
    return jnp.moveaxis(y, 0, 1)

  def step(self, state: jax.Array, u_t: jax.Array):
    """Recurrent mode: ``state (batch, H, N)``, ``u_t (batch, H)`` -> ``(y_t (batch, H), state)``.

    Rebuilds ``Ab`` on every call; to decode many steps, jit the loop so that it is hoisted.
    """
    _check_step(state, u_t, (self.d_model, self.d_state))
    Ab, Bb, C = self.discrete()
    u32 = u_t.astype(jnp.float32)
    y, state = _steps(Ab, Bb, C, state, u32)
    return (y + u32 * self.D[...].astype(jnp.float32)).astype(u_t.dtype), state
