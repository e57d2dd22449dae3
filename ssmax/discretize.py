"""Discretization of a continuous-time SSM ``x'(t) = A x(t) + B u(t)`` with step ``dt``.

Each function returns ``(Ab, Bb)`` of the discrete system ``x_k = Ab x_{k-1} + Bb u_k`` and takes
either form of ``A``:

  * dense ``A (N, N)`` with ``B (N,)`` and a scalar ``dt``;
  * diagonal ``A (N,)`` (the diagonal of the state matrix) with ``B (N,)`` and ``dt`` a scalar or
    an array broadcastable to ``(N,)``.

``A`` and ``B`` may be real or complex; results have the common dtype of ``A``, ``B`` and ``dt``.
A stack of SSMs (one per channel) is ``jax.vmap`` over these functions, e.g.
``jax.vmap(zoh)(A (H, N), B (H, N), dt (H,))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import expm

from ssmax import _checks


def _check(A, B, dt):
  """Checks ``A``, ``B``, ``dt``; returns them as arrays of one dtype and whether ``A`` is dense."""
  r = _checks.rank("A", A, (1, 2), "(N,) diagonal or (N, N) dense")
  _checks.floating("A", A, allow_complex=True)
  n = _checks.shape_of(A)[0]
  if r == 2:
    _checks.shape("A", A, (n, n), "(N, N), square")
  _checks.shape("B", B, (n,), f"(N,) with N = {n} from A")
  _checks.floating("B", B, allow_complex=True)
  if not isinstance(dt, (int, float)) or isinstance(dt, bool):
    _checks.floating("dt", dt)
    if r == 2:
      _checks.rank("dt", dt, 0, "(a scalar, for dense A)")
    elif len(_checks.shape_of(dt)) > 1 or _checks.shape_of(dt) not in ((), (1,), (n,)):
      raise ValueError(f"dt must be a scalar or have shape (1,) or ({n},) for diagonal A; "
                       f"got shape {_checks.shape_of(dt)}")
  _checks.positive_finite_values("dt", dt)  # a step <= 0, NaN or inf gives NaN or a blow-up
  dtype = jnp.result_type(A, B, dt)
  dtype = jnp.result_type(dtype, jnp.float32)  # at least float32: expm and solve need it
  return (jnp.asarray(A, dtype), jnp.asarray(B, dtype), jnp.asarray(dt, dtype), r == 2)


def _phi1(x: jax.Array) -> jax.Array:
  """``expm1(x) / x`` elementwise, real or complex, with value and gradient right at ``x = 0``.

  Below ``|x| = 1e-4`` the Taylor series ``1 + x/2 + x^2/6 + x^3/24`` (error < 1e-18) replaces
  the quotient; the double ``where`` keeps the unused branch's 0/0 out of the gradient.
  """
  small = jnp.abs(x) < 1e-4
  safe = jnp.where(small, jnp.ones_like(x), x)
  series = 1 + x / 2 * (1 + x / 3 * (1 + x / 4))
  return jnp.where(small, series, jnp.expm1(safe) / safe)


def zoh(A, B, dt) -> tuple[jax.Array, jax.Array]:
  """Zero-order hold: ``Ab = exp(dt A)``, ``Bb = (int_0^dt exp(s A) ds) B``.

  ``Bb`` equals ``A^{-1} (exp(dt A) - I) B`` when ``A`` is invertible, but ``A`` is never inverted,
  so a singular ``A`` (a zero eigenvalue, e.g. HiPPO-FouT's constant mode) is fine:

    * dense: one matrix exponential of the block matrix ``dt [[A, B], [0, 0]]``, whose top row is
      ``[Ab, Bb]`` (Van Loan 1978);
    * diagonal: ``Bb = dt * (expm1(dt A) / (dt A)) * B``, the ratio by its Taylor series near 0.

  Args:
    A: ``(N, N)`` dense or ``(N,)`` diagonal state matrix, float or complex.
    B: ``(N,)`` input vector.
    dt: step > 0, finite; a scalar for dense ``A``, a scalar or ``(N,)`` for diagonal ``A``.

  Returns:
    ``Ab`` with ``A``'s shape and ``Bb (N,)``, in the common dtype (at least float32).

  Raises:
    ValueError: on a bad shape or dtype, or a concrete ``dt`` that is not finite and > 0 (a ``dt``
      traced under ``jax.jit`` cannot be inspected and is not checked).
  """
  A, B, dt, dense = _check(A, B, dt)
  if not dense:
    x = dt * A
    return jnp.exp(x), dt * _phi1(x) * B
  n = A.shape[0]
  block = jnp.zeros((n + 1, n + 1), A.dtype).at[:n, :n].set(A).at[:n, n].set(B)
  e = expm(dt * block)
  return e[:n, :n], e[:n, n]


def bilinear(A, B, dt) -> tuple[jax.Array, jax.Array]:
  """Bilinear (Tustin) transform, S4 eq. (3).

  ``Ab = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``Bb = (I - dt/2 A)^{-1} dt B``, by a linear solve
  (dense) or a division (diagonal); ``I - dt/2 A`` must be invertible, which holds for stable ``A``.

  Args:
    A: ``(N, N)`` dense or ``(N,)`` diagonal state matrix, float or complex.
    B: ``(N,)`` input vector.
    dt: step > 0, finite; a scalar for dense ``A``, a scalar or ``(N,)`` for diagonal ``A``.

  Returns:
    ``Ab`` with ``A``'s shape and ``Bb (N,)``, in the common dtype (at least float32).

  Raises:
    ValueError: on a bad shape or dtype, or a concrete ``dt`` that is not finite and > 0 (a ``dt``
      traced under ``jax.jit`` cannot be inspected and is not checked).
  """
  A, B, dt, dense = _check(A, B, dt)
  if not dense:
    den = 1 - dt / 2 * A
    return (1 + dt / 2 * A) / den, dt * B / den
  eye = jnp.eye(A.shape[0], dtype=A.dtype)
  left = eye - dt / 2 * A
  sol = jnp.linalg.solve(left, jnp.concatenate([eye + dt / 2 * A, (dt * B)[:, None]], axis=1))
  return sol[:, :-1], sol[:, -1]
