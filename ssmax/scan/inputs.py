"""The selective scan's inputs: checked once at trace time, then carried in one canonical form."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssmax import _checks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScanInputs:
  """Checked, canonical inputs: B and C always grouped ``(batch, length, groups, state)``.

  A pytree whose leaves are the arrays; ``delta_softplus`` is static metadata, so the inputs pass
  whole through ``jax.checkpoint`` and other transforms.
  """

  u: jax.Array  # (batch, length, channels)
  delta: jax.Array  # (batch, length, channels)
  A: jax.Array  # (channels, state)
  B: jax.Array  # (batch, length, groups_b, state)
  C: jax.Array  # (batch, length, groups_c, state)
  D: jax.Array | None  # (channels,)
  z: jax.Array | None  # (batch, length, channels)
  delta_bias: jax.Array | None  # (channels,)
  initial_state: jax.Array | None  # (batch, channels, state)
  delta_softplus: bool = dataclasses.field(default=False, metadata=dict(static=True))
  segment_ids: jax.Array | None = None  # (batch, length) integer; the state resets where it changes

  def replace(self, **changes) -> "ScanInputs":
    return dataclasses.replace(self, **changes)


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 initial_state=None, segment_ids=None) -> ScanInputs:
  """Checks shapes and dtypes at trace time and returns canonical :class:`ScanInputs`.

  Shapes are those of :func:`ssmax.selective_scan`. Raises ``ValueError`` naming the argument.
  """
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
    if (jnp.issubdtype(_checks.dtype_of(x), jnp.complexfloating)
        and not jnp.issubdtype(_checks.dtype_of(A), jnp.complexfloating)):
      # The recurrence would keep only the real part of the state, silently.
      raise ValueError(f"{name} is complex ({_checks.dtype_of(x)}) but A is real "
                       f"({_checks.dtype_of(A)}): the imaginary part would be dropped; pass a "
                       f"complex A (A.astype(jnp.complex64)) or a real {name}")
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
  if segment_ids is not None:
    check_segment_ids(segment_ids, (b, l))
  return ScanInputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                    segment_ids)


def check_segment_ids(segment_ids, shape, name: str = "segment_ids", like: str = "u") -> None:
  """A ValueError unless ``segment_ids`` is an integer array of ``shape`` ``(batch, length)``,
  the first two axes of the argument named ``like``."""
  _checks.rank(name, segment_ids, 2, "(batch, length)")
  _checks.shape(name, segment_ids, shape, f"(batch, length), like {like}'s first two axes")
  dtype = _checks.dtype_of(segment_ids)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype; got {dtype}")
