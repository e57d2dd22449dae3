"""One step of the selective scan from a given state: the recurrent (decoding) mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssmax import _checks
from ssmax.scan import dispatch, reference
from ssmax.scan.inputs import ScanInputs, check_inputs


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, delta_proj=None, backend="auto"):
  """One step of :func:`ssmax.selective_scan` from ``state``.

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
      instead of several small XLA fusions); the others run the step in plain JAX (see
      :func:`ssmax.scan.dispatch.resolve_step` for why ``"auto"`` does).

  Returns:
    ``(y, new_state)``: ``y`` ``(batch, channels)`` in ``u.dtype`` and the state after the step,
    ``(batch, channels, state)`` in float32 (complex64). Differentiable with every backend (the
    kernel's backward differentiates the plain step).

  Raises:
    ValueError: on a bad shape, dtype or backend, naming the argument.
  """
  backend = dispatch.resolve_step(backend)
  _checks.rank("state", state, 3, "(batch, channels, state)")
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
  for name, m in (("B", B), ("C", C)):
    _checks.rank(name, m, (2, 3), "(batch, state) or (batch, groups, state)")
  if z is not None:
    _checks.rank("z", z, 2, "(batch, channels), like u")
  lift = lambda m: None if m is None else m[:, None]
  try:
    x = check_inputs(u[:, None], full, A, lift(B), lift(C), D, lift(z), delta_bias,
                     delta_softplus, initial_state=state)
  except ValueError as e:
    # check_inputs speaks of sequences; here the arguments are one step of them.
    raise ValueError(str(e).replace("initial_state", "state")
                     .replace("(batch, length, channels)", "(batch, channels)")) from None
  args = (state, u, delta, x.A, x.B[:, 0], x.C[:, 0], x.D, z, x.delta_bias, delta_proj)
  if backend is not dispatch.Backend.PALLAS:
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
  cdt, cplx = reference.compute_dtypes(x)
  dt = reference.delta(x)[:, 0]
  d = u.shape[1]
  h = (jnp.exp(dt[..., None] * A.astype(cdt)) * state.astype(cdt)
       + (dt * u.astype(jnp.float32))[..., None] * reference.expand_groups(B.astype(cdt), d))
  y = jnp.sum(h * reference.expand_groups(C.astype(cdt), d), axis=-1)
  return reference.finish(x, y[:, None], cplx)[:, 0].astype(u.dtype), h


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
