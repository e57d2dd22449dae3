"""The selective scan (Mamba's S6): one public function, several backends, one set of semantics.

For each batch element, channel d and state index n (Mamba paper, Algorithm 2; the reference
implementation's ``selective_scan_ref``)::

    Δ_t    = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t    = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t      (h_{-1} = initial_state, default 0)
    y_t    = Re(C_t · h_t) + D u_t                   (2 Re(...) when A is complex, as the reference)
    y_t   *= SiLU(z_t)                               (gate optional)

Everything inside runs in float32 (complex64 for complex A); ``y`` comes back in ``u.dtype`` and the
last state in float32 (complex64).

Backends:
  * ``"sequential"``: ``lax.scan`` over time, state ``(batch, channels, state)`` in the carry.
  * ``"associative"``: ``lax.associative_scan`` over ``(exp(ΔA), ΔBu)`` pairs; materialises
    ``(batch, length, channels, state)``, O(log length) depth.
  * ``"pallas"``: the fused kernel of :mod:`ssmax.pallas` (interpret mode off the GPU).
  * ``"auto"``: ``"pallas"`` on a GPU when the kernel takes the inputs, else ``"associative"``.

Sequence parallelism (``sequence_axis="seq"``, inside ``jax.shard_map``): the length is split into
contiguous shards along a mesh axis. The recurrence is linear in the state, so shard ``i`` can scan
its piece from zero and add the contribution of the state ``h_in`` entering it afterwards::

    y_t += Re(C_t · exp(A Σ_{s<=t} Δ_s) h_in) * SiLU(z_t)       (t local to the shard)

``h_in`` comes from an exclusive scan over the shards of ``(exp(A ΣΔ), last state)`` pairs, which
are gathered across the axis (one ``all_gather`` of ``(batch, channels, state)`` per shard).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ssmax import _checks

BACKENDS = ("auto", "sequential", "associative", "pallas")


class ScanInputs(NamedTuple):
  """Checked, canonical inputs: B and C always grouped ``(batch, length, groups, state)``."""

  u: jax.Array  # (batch, length, channels)
  delta: jax.Array  # (batch, length, channels)
  A: jax.Array  # (channels, state)
  B: jax.Array  # (batch, length, groups_b, state)
  C: jax.Array  # (batch, length, groups_c, state)
  D: jax.Array | None  # (channels,)
  z: jax.Array | None  # (batch, length, channels)
  delta_bias: jax.Array | None  # (channels,)
  initial_state: jax.Array | None  # (batch, channels, state)
  delta_softplus: bool


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 initial_state=None) -> ScanInputs:
  """Checks shapes and dtypes at trace time and returns canonical :class:`ScanInputs`."""
  _checks.rank("u", u, 3, "(batch, length, channels)")
  _checks.floating("u", u)
  b, l, d = _checks.shape_of(u)
  if l < 1:
    raise ValueError(f"u must have length >= 1 along axis 1; got shape {(b, l, d)}")
  _checks.shape("delta", delta, (b, l, d), "(batch, length, channels), like u")
  _checks.floating("delta", delta)
  _checks.rank("A", A, 2, "(channels, state)")
  _checks.floating("A", A, allow_complex=True)
  if _checks.shape_of(A)[0] != d:
    raise ValueError(f"A must have shape ({d}, state) to match u's {d} channels; got {_checks.shape_of(A)}")
  n = _checks.shape_of(A)[1]
  grouped = []
  for name, x in (("B", B), ("C", C)):
    r = _checks.rank(name, x, (3, 4), "(batch, length, state) or (batch, length, groups, state)")
    _checks.floating(name, x, allow_complex=True)
    if r == 3:
      _checks.shape(name, x, (b, l, n), "(batch, length, state)")
      x = x[:, :, None, :]
    else:
      _checks.shape(name, x, (b, l, None, n), "(batch, length, groups, state)")
      g = _checks.shape_of(x)[2]
      if g < 1 or d % g:
        raise ValueError(f"{name} has {g} groups, which must divide the {d} channels; got shape {_checks.shape_of(x)}")
    grouped.append(x)
  B, C = grouped
  if D is not None:
    _checks.shape("D", D, (d,), "(channels,)")
    _checks.floating("D", D)
  if z is not None:
    _checks.shape("z", z, (b, l, d), "(batch, length, channels), like u")
    _checks.floating("z", z)
  if delta_bias is not None:
    _checks.shape("delta_bias", delta_bias, (d,), "(channels,)")
    _checks.floating("delta_bias", delta_bias)
  if initial_state is not None:
    _checks.shape("initial_state", initial_state, (b, d, n), "(batch, channels, state)")
    _checks.floating("initial_state", initial_state, allow_complex=True)
  if not isinstance(delta_softplus, bool):
    raise ValueError(f"delta_softplus must be a Python bool; got {delta_softplus!r}")
  return ScanInputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, backend="auto",
                   sequence_axis=None):
  """Selective scan with the semantics of Mamba's ``selective_scan_ref``, batch-major layout.

  Args:
    u: ``(batch, length, channels)`` input, float32/bfloat16/float16; ``length >= 1``.
    delta: ``(batch, length, channels)`` step sizes Δ before bias and softplus.
    A: ``(channels, state)`` continuous-time diagonal transition, float32 or complex64.
    B: ``(batch, length, state)`` or ``(batch, length, groups, state)``; groups divide the channels
      contiguously (channel ``c`` reads group ``c // (channels // groups)``).
    C: like ``B`` (its own group count).
    D: optional ``(channels,)`` skip connection.
    z: optional ``(batch, length, channels)`` gate; ``y *= SiLU(z)``.
    delta_bias: optional ``(channels,)`` added to ``delta`` before the softplus.
    delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
    initial_state: optional ``(batch, channels, state)`` state before the first step.
    return_last_state: also return the state after the last step.
    backend: one of ``"auto"``, ``"sequential"``, ``"associative"``, ``"pallas"``.
    sequence_axis: optional name of a mesh axis along which the length is sharded. Only valid
      inside ``jax.shard_map`` (or another map) binding that axis: every argument with a length
      axis is then this device's contiguous piece of it, in axis order, while ``A``, ``D``,
      ``delta_bias`` and ``initial_state`` are the same on every shard of the axis. The result
      is this device's piece of ``y`` and the last state of the whole sequence, identical on all
      shards. See :func:`ssmax.parallel.selective_scan` for the version taking global arrays.

  Returns:
    ``y`` of shape ``(batch, length, channels)`` in ``u.dtype``; with ``return_last_state`` the pair
    ``(y, last_state)`` with ``last_state`` ``(batch, channels, state)`` in float32 (complex64 when
    ``A`` is complex).

  Raises:
    ValueError: on a bad shape, dtype, group count or backend, naming the argument; on a
      ``sequence_axis`` that is not a string or not bound by an enclosing ``shard_map``.
  """
  _checks.one_of("backend", backend, BACKENDS)
  x = check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
  if sequence_axis is None:
    y, last = _run(resolve_backend(backend, x), x)
  else:
    _check_sequence_axis(sequence_axis)
    # The Pallas kernel's outputs are not yet typed for shard_map's varying-axis checks.
    if backend == "pallas":
      raise ValueError('backend="pallas" does not support sequence_axis yet; use '
                       'backend="associative" or "sequential" (or "auto", which picks one)')
    if backend == "auto":
      backend = "associative"
    y, last = _sequence_parallel(backend, x, sequence_axis)
  y = y.astype(x.u.dtype)
  return (y, last) if return_last_state else y


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, delta_proj=None, backend="auto"):
  """One step of :func:`selective_scan` from ``state``: the recurrent (decoding) mode.

  Equal to ``selective_scan`` on a sequence of length one with ``initial_state=state`` and
  ``return_last_state=True``, with one addition: ``delta`` may come in low rank, as Mamba's
  ``x_proj`` makes it, with ``Δ = delta @ delta_proj`` (float32) before the bias and softplus.

  Args:
    state: ``(batch, channels, state)`` state before the step (float32, or complex64 for a
      complex ``A``).
    u: ``(batch, channels)`` input, float32/bfloat16/float16.
    delta: ``(batch, channels)``, or ``(batch, rank)`` when ``delta_proj`` is given.
    A: ``(channels, state)``.
    B, C: ``(batch, state)`` or ``(batch, groups, state)``.
    D, delta_bias: optional ``(channels,)``; z: optional ``(batch, channels)`` gate.
    delta_softplus: apply ``softplus`` to ``Δ + delta_bias``.
    delta_proj: optional ``(rank, channels)`` projection of a low-rank ``delta``.
    backend: ``"pallas"`` runs the fused step kernel (:mod:`ssmax.pallas.state_update`, one launch
      instead of several small XLA fusions); ``"sequential"``, ``"associative"`` and ``"auto"``
      run the step in plain JAX (for one step the scans are the same thing). ``"auto"`` does not
      pick the kernel: in an H100 decode-step profile (experiments/profile_decode.py) decode
      steps with the kernel took 1-2% more time than with XLA's fusions at batch 64 and, with
      the copies and slices around it, 18-21% more at batch 1.

  Returns:
    ``(y, new_state)``: ``y`` ``(batch, channels)`` in ``u.dtype`` and the state after the step,
    ``(batch, channels, state)`` in float32 (complex64). Differentiable with every backend (the
    kernel's backward differentiates the plain step).

  Raises:
    ValueError: on a bad shape, dtype or backend, naming the argument.
  """
  _checks.one_of("backend", backend, BACKENDS)
  _checks.rank("u", u, 2, "(batch, channels)")
  b, d = _checks.shape_of(u)
  if delta_proj is not None:
    _checks.rank("delta_proj", delta_proj, 2, "(rank, channels)")
    _checks.floating("delta_proj", delta_proj)
    r = _checks.shape_of(delta_proj)[0]
    _checks.shape("delta_proj", delta_proj, (r, d), f"(rank, channels) for u's {d} channels")
    _checks.shape("delta", delta, (b, r), "(batch, rank), the rows of delta_proj")
    _checks.floating("delta", delta)
    full = jax.ShapeDtypeStruct((b, 1, d), jnp.float32)
  else:
    _checks.rank("delta", delta, 2, "(batch, channels), like u")
    full = delta[:, None]
  lift = lambda m: None if m is None else m[:, None]
  for name, m in (("B", B), ("C", C)):
    _checks.rank(name, m, (2, 3), "(batch, state) or (batch, groups, state)")
  _checks.rank("state", state, 3, "(batch, channels, state)")
  if z is not None:
    _checks.rank("z", z, 2, "(batch, channels), like u")
  x = check_inputs(u[:, None], full, A, lift(B), lift(C), D, lift(z), delta_bias, delta_softplus,
                   initial_state=state)
  args = (state, u, delta, x.A, x.B[:, 0], x.C[:, 0], x.D, z, x.delta_bias, delta_proj)
  if backend != "pallas":
    return _plain_step(delta_softplus, *args)
  from ssmax.pallas import state_update  # the kernels layer; imported only when used

  reason = state_update.unsupported_reason(state, u, delta, A, B, C, D, z, delta_bias, delta_proj)
  if reason is not None:
    raise ValueError(f'backend="pallas" cannot take these inputs: {reason}; use '
                     'backend="auto" or "sequential"')
  return _kernel_step(delta_softplus, *args)


def _plain_step(softplus, state, u, delta, A, B, C, D, z, delta_bias, delta_proj):
  """The step in plain JAX on canonical inputs (B and C ``(batch, groups, state)``)."""
  if delta_proj is not None:
    delta = jnp.dot(delta.astype(jnp.float32), delta_proj.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)
  x = ScanInputs(u[:, None], delta[:, None], A, B[:, None], C[:, None], D,
                 None if z is None else z[:, None], delta_bias, state, softplus)
  cdt, cplx = _compute_dtypes(x)
  dt = _delta(x)[:, 0]
  d = u.shape[1]
  h = (jnp.exp(dt[..., None] * A.astype(cdt)) * state.astype(cdt)
       + (dt * u.astype(jnp.float32))[..., None] * _expand_groups(B.astype(cdt), d))
  y = jnp.sum(h * _expand_groups(C.astype(cdt), d), axis=-1)
  return _finish(x, y[:, None], cplx)[:, 0].astype(u.dtype), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_step(softplus, *args):
  from ssmax.pallas import state_update

  return state_update.selective_state_update(*args, delta_softplus=softplus,
                                             interpret=jax.default_backend() != "gpu")


def _kernel_step_fwd(softplus, *args):
  return _kernel_step(softplus, *args), args


def _kernel_step_bwd(softplus, args, cts):
  _, vjp = jax.vjp(functools.partial(_plain_step, softplus), *args)
  return vjp(cts)


_kernel_step.defvjp(_kernel_step_fwd, _kernel_step_bwd)


def _run(backend: str, x: ScanInputs):
  """One concrete backend on one device: ``y`` (float32 or u.dtype) and the last state."""
  if backend == "sequential":
    return _sequential(x)
  if backend == "associative":
    return _associative(x)
  from ssmax import pallas as ssmax_pallas  # the kernels layer; imported only when used

  return ssmax_pallas.selective_scan(
      x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, x.initial_state,
      delta_softplus=x.delta_softplus, interpret=jax.default_backend() != "gpu")


def resolve_backend(backend: str, x: ScanInputs) -> str:
  """Maps ``"auto"`` to a concrete backend; checks that ``"pallas"`` can take ``x``."""
  if backend in ("sequential", "associative"):
    return backend
  from ssmax import pallas as ssmax_pallas

  reason = ssmax_pallas.unsupported_reason(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias,
                                           x.initial_state)
  if backend == "pallas":
    if reason is not None:
      raise ValueError(f'backend="pallas" cannot take these inputs: {reason}; use backend="auto" '
                       'or "associative"')
    return "pallas"
  return "pallas" if reason is None and jax.default_backend() == "gpu" else "associative"


# ----------------------------------------------------------------------------------------------
# Shared pieces, float32 inside.


def _compute_dtypes(x: ScanInputs):
  cplx = jnp.issubdtype(x.A.dtype, jnp.complexfloating)
  return (jnp.complex64 if cplx else jnp.float32), cplx


def _delta(x: ScanInputs) -> jax.Array:
  """Δ after bias and softplus, float32 ``(batch, length, channels)``."""
  dt = x.delta.astype(jnp.float32)
  if x.delta_bias is not None:
    dt = dt + x.delta_bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if x.delta_softplus else dt


def _expand_groups(m: jax.Array, channels: int) -> jax.Array:
  """``(..., groups, state)`` -> ``(..., channels, state)``, groups split channels contiguously."""
  return jnp.repeat(m, channels // m.shape[-2], axis=-2)


def _finish(x: ScanInputs, y: jax.Array, cplx: bool) -> jax.Array:
  """Real part (doubled for complex A, as the reference), D skip and SiLU gate, float32."""
  if cplx:
    y = 2.0 * jnp.real(y)
  u = x.u.astype(jnp.float32)
  if x.D is not None:
    y = y + u * x.D.astype(jnp.float32)
  if x.z is not None:
    y = y * jax.nn.silu(x.z.astype(jnp.float32))
  return y


def _sequential(x: ScanInputs):
  cdt, cplx = _compute_dtypes(x)
  b, _, d = x.u.shape
  A = x.A.astype(cdt)
  dt = _delta(x)
  u = x.u.astype(jnp.float32)
  # Zeros typed like one step's update, so that under shard_map the scan carry varies over the
  # same mesh axes as the inputs (zeros_like keeps that type; the step itself is never computed).
  zeros = jnp.zeros_like(jnp.exp(dt[:, 0, :, None] * A) * (dt[:, 0] * u[:, 0])[..., None]
                         * _expand_groups(x.B[:, 0].astype(cdt), d))
  h0 = zeros if x.initial_state is None else x.initial_state.astype(cdt) + zeros

  def step(h, inputs):
    dt_t, u_t, B_t, C_t = inputs  # (b, d), (b, d), (b, g, n), (b, g, n)
    B_t = _expand_groups(B_t.astype(cdt), d)
    C_t = _expand_groups(C_t.astype(cdt), d)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t
    return h, jnp.sum(h * C_t, axis=-1)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  last, y = lax.scan(step, h0, (time_major(dt), time_major(u), time_major(x.B), time_major(x.C)))
  return _finish(x, jnp.moveaxis(y, 0, 1), cplx), last


def _associative(x: ScanInputs):
  cdt, cplx = _compute_dtypes(x)
  b, l, d = x.u.shape
  A = x.A.astype(cdt)
  dt = _delta(x)
  u = x.u.astype(jnp.float32)
  decay = jnp.exp(dt[..., None] * A)  # (b, l, d, n)
  drive = (dt * u)[..., None] * _expand_groups(x.B.astype(cdt), d)
  if x.initial_state is not None:
    drive = drive.at[:, 0].add(decay[:, 0] * x.initial_state.astype(cdt))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = lax.associative_scan(combine, (decay, drive), axis=1)
  y = jnp.sum(h * _expand_groups(x.C.astype(cdt), d), axis=-1)
  return _finish(x, y, cplx), h[:, -1]


# ----------------------------------------------------------------------------------------------
# Sequence parallelism: state passing between contiguous shards of the length.


def _check_sequence_axis(axis) -> None:
  if not isinstance(axis, str):
    raise ValueError(f"sequence_axis must be a mesh axis name (str) or None; got {axis!r}")
  try:
    lax.axis_size(axis)
  except NameError:
    raise ValueError(
        f"sequence_axis={axis!r} is not an axis bound here: call selective_scan(..., "
        f"sequence_axis={axis!r}) inside jax.shard_map over a mesh with that axis, or use "
        "ssmax.parallel.selective_scan with global arrays") from None


def _sequence_parallel(backend: str, x: ScanInputs, axis: str):
  """This shard's ``y`` (float32) and the global last state, for inputs sharded along ``axis``.

  Rematerialised: the backward pass reruns the shard's scan and keeps only the inputs, since this
  mode exists for sequences too long to hold more. (It also keeps zero-size intermediates of
  ``lax.associative_scan`` from becoming residuals across ``shard_map``, which XLA's Shardy
  partitioner in jax 0.11.2 crashes on.)
  """
  softplus = x.delta_softplus
  body = lambda *arrays: _sequence_parallel_body(backend, ScanInputs(*arrays, softplus), axis)
  return jax.checkpoint(body)(*x[:-1])


def _sequence_parallel_body(backend: str, x: ScanInputs, axis: str):
  cdt, cplx = _compute_dtypes(x)
  b, l, d = x.u.shape
  A = x.A.astype(cdt)
  # 1. Scan the local piece from zero state; the backend keeps its own fusion of D and the gate.
  y, h_local = _run(backend, x._replace(initial_state=None))
  y = y.astype(jnp.float32)
  h_local = h_local.astype(cdt)
  # 2. The state entering this shard, from every shard's total decay exp(A ΣΔ) and last state.
  dt_cum = jnp.cumsum(_delta(x), axis=1)  # (b, l, d)
  decay_total = jnp.exp(dt_cum[:, -1, :, None] * A)  # (b, d, n)
  h_in, h_last = _pass_state(decay_total, h_local, axis, x.initial_state)
  # 3. Correction y_t += Re(C_t · exp(A cumΔ_t) h_in), gated like y; C grouped over channels.
  g = x.C.shape[2]
  carried = (jnp.exp(dt_cum[..., None] * A) * h_in[:, None]).reshape(b, l, g, d // g, -1)
  corr = jnp.sum(carried * x.C.astype(cdt)[:, :, :, None, :], axis=-1).reshape(b, l, d)
  corr = 2.0 * jnp.real(corr) if cplx else corr
  if x.z is not None:
    corr = corr * jax.nn.silu(x.z.astype(jnp.float32))
  return y + corr, h_last


def _pass_state(decay, last, axis, initial_state=None):
  """Exclusive scan over the shards of ``axis`` of ``h_out = decay * h_in + last``.

  ``decay`` and ``last`` (same shape) are this shard's total transition and its final state from
  zero; returns the state entering this shard (``initial_state``, or zeros, on the first) and the
  state after the last shard, the latter identical on every shard.
  """
  decays = lax.all_gather(decay, axis)  # (shards, ...)
  lasts = lax.all_gather(last, axis)
  zeros = jnp.zeros_like(last)  # typed as varying along the axis, like the scan's carry
  h0 = zeros if initial_state is None else initial_state.astype(last.dtype) + zeros

  def step(h_in, shard):
    decay, h_shard = shard
    return decay * h_in + h_shard, h_in

  h_last, entering = lax.scan(step, h0, (decays, lasts))
  index = lax.axis_index(axis)
  # Every shard computed the same h_last; selecting shard 0's through psum (adding exact zeros)
  # makes it a value that is replicated along the axis as far as shard_map's checks can see.
  h_last = lax.psum(jnp.where(index == 0, h_last, jnp.zeros_like(h_last)), axis)
  return entering[index], h_last
