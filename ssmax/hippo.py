"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) forms, and S4D initialisers.

A HiPPO operator is the continuous-time linear system ``x'(t) = A x(t) + B u(t)`` whose state
``x (N,)`` holds the coefficients of the input's history projected on ``N`` orthogonal functions
(HiPPO paper, Gu et al. 2020, Appendix D; S4 paper, Gu et al. 2022, Section 3.1). Signs follow the
S4 code's ``transition``: ``A`` is already negated, so the dynamics are stable as written.

Every matrix is built from a closed form, one small function per measure. The dense constructors
return float32 by default; pass ``dtype=jnp.float64`` (with x64 enabled) for exact values. The NPLR
decomposition is computed in the widest float that is enabled (float64 under
``jax.enable_x64(True)``, else float32) so that its identity holds to that precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from ssmax import _checks

MEASURES_NPLR = ("legs", "legt", "lagt", "fout")


def _wide_float():
  """float64 when x64 is enabled, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


# Constructors are traced once per (N, dtype) and compiled as one program: much cheaper than
# dispatching their dozen small ops one by one.
_static_jit = functools.partial(jax.jit, static_argnums=(0, 1))


def _check_dtype(dtype):
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating-point dtype; got {jnp.dtype(dtype)}")


# ----------------------------------------------------------------------------------------------
# Dense transition matrices.


def legs(N: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """HiPPO-LegS (scaled Legendre measure), S4 eq. (2).

  ``A[n, k] = -sqrt(2n+1) sqrt(2k+1)`` for ``n > k``, ``-(n+1)`` for ``n = k``, ``0`` for ``n < k``;
  ``B[n] = sqrt(2n+1)``.

  Args:
    N: state size, a positive int.
    dtype: floating output dtype.

  Returns:
    ``A (N, N)`` and ``B (N,)`` in ``dtype``.
  """
  N = _checks.positive_int("N", N)
  _check_dtype(dtype)
  return _legs(N, jnp.dtype(dtype))


@_static_jit
def _legs(N, dtype):
  q = jnp.arange(N, dtype=_wide_float())
  r = jnp.sqrt(2 * q + 1)
  n, k = q[:, None], q[None, :]
  A = jnp.where(n > k, -r[:, None] * r[None, :], 0.0) - jnp.diag(q + 1)
  return A.astype(dtype), r.astype(dtype)


def legt(N: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """HiPPO-LegT (translated Legendre measure on a window), HiPPO paper Appendix D.1.

  As in S4's ``transition("legt")``, halved for the unit window:
  ``A[n, k] = -1/2 sqrt(2n+1) sqrt(2k+1) * ((-1)^(n-k) if n < k else 1)``,
  ``B[n] = 1/2 sqrt(2n+1)``.

  Args:
    N: state size, a positive int.
    dtype: floating output dtype.

  Returns:
    ``A (N, N)`` and ``B (N,)`` in ``dtype``.
  """
  N = _checks.positive_int("N", N)
  _check_dtype(dtype)
  return _legt(N, jnp.dtype(dtype))


@_static_jit
def _legt(N, dtype):
  q = jnp.arange(N, dtype=_wide_float())
  r = jnp.sqrt(2 * q + 1)
  n, k = q[:, None], q[None, :]
  sign = jnp.where(n < k, 1.0 - 2.0 * jnp.mod(k - n, 2), 1.0)
  A = -0.5 * r[:, None] * sign * r[None, :]
  return A.astype(dtype), (0.5 * r).astype(dtype)


def lagt(N: int, alpha: float = 0.0, beta: float = 1.0, dtype=jnp.float32
         ) -> tuple[jax.Array, jax.Array]:
  """HiPPO-LagT for the generalised Laguerre measure, HiPPO paper Appendix D.2.

  The S4 code's generalised Laguerre form (``transition("glagt")``) with weights
  ``L[n] = sqrt(Gamma(n+alpha+1) / Gamma(n+1))``::

      A = -diag(L)^-1 [ (1+beta)/2 I + strictly-lower ones ] diag(L)
      B[n] = binom(n+alpha, n) / L[n] * beta^((1-alpha)/2) / sqrt(Gamma(1-alpha))

  At the defaults ``alpha=0, beta=1`` this is the HiPPO paper's LagT:
  ``A[n, k] = -1`` for ``n >= k``, ``0`` above; ``B[n] = 1``. (S4's older ``transition("lagt")``
  has ``-1/2`` on the diagonal instead: the ``beta -> 0`` limit of ``A``.)

  Args:
    N: state size, a positive int.
    alpha: Laguerre order, ``-1 < alpha < 1``.
    beta: time scale, ``> 0``.
    dtype: floating output dtype.

  Returns:
    ``A (N, N)`` and ``B (N,)`` in ``dtype``.
  """
  N = _checks.positive_int("N", N)
  _check_dtype(dtype)
  if not -1.0 < float(alpha) < 1.0:
    raise ValueError(f"alpha must satisfy -1 < alpha < 1; got {alpha!r}")
  if not float(beta) > 0.0:
    raise ValueError(f"beta must be > 0; got {beta!r}")
  return _lagt(N, jnp.dtype(dtype), float(alpha), float(beta))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _lagt(N, dtype, alpha, beta):
  q = jnp.arange(N, dtype=_wide_float())
  A = -jnp.eye(N, dtype=q.dtype) * (1 + beta) / 2 - jnp.tril(jnp.ones((N, N), q.dtype), -1)
  if alpha == 0:  # L = 1 and binom = 1: skip the gamma functions, exact in any precision
    B = jnp.full((N,), beta**0.5, q.dtype)
  else:
    log_l = 0.5 * (gammaln(q + alpha + 1) - gammaln(q + 1))
    binom = jnp.exp(gammaln(alpha + q + 1) - gammaln(q + 1) - gammaln(alpha + 1))
    A = jnp.exp(log_l[None, :] - log_l[:, None]) * A
    B = binom * jnp.exp(-log_l - 0.5 * gammaln(1 - alpha)) * beta ** ((1 - alpha) / 2)
  return A.astype(dtype), B.astype(dtype)


def _fout_input(N: int, dtype) -> jax.Array:
  """FouT's ``B``: 1 for the constant, sqrt(2) for each cosine, 0 for each sine."""
  j = jnp.arange(N)
  return jnp.where(j == 0, 1.0, jnp.where(j % 2 == 0, jnp.sqrt(2.0), 0.0)).astype(dtype)


def fout(N: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """HiPPO-FouT (translated Fourier basis on a unit window), S4 code's ``transition("fout")``.

  The basis is ``[1, sin 0, cos 1, sin 1, cos 2, sin 2, ...]`` (the ``sin 0`` slot is kept, as in
  S4, so that frequencies sit in pairs). With ``B`` from the basis values at the window's end
  (``1`` for the constant, ``sqrt(2)`` for cosines, ``0`` for sines)::

      A = pi * (rotation generator of each (cos f, sin f) pair) - B B^T
      A[k+1, k] = +pi k/2,  A[k, k+1] = -pi k/2   for even k >= 2

  For odd ``N`` this is the leading ``N x N`` block of ``fout(N + 1)``: the last cosine has no sine
  partner.

  Args:
    N: state size, a positive int.
    dtype: floating output dtype.

  Returns:
    ``A (N, N)`` and ``B (N,)`` in ``dtype``.
  """
  N = _checks.positive_int("N", N)
  _check_dtype(dtype)
  return _fout(N, jnp.dtype(dtype))


@_static_jit
def _fout(N, dtype):
  B = _fout_input(N, _wide_float())
  return (_fout_skew(N, B.dtype) - B[:, None] * B[None, :]).astype(dtype), B.astype(dtype)


def _fout_skew(N: int, dtype) -> jax.Array:
  """The skew-symmetric (rotation) part of FouT, ``(N, N)``."""
  k = jnp.arange(N - 1)
  d = jnp.where(k % 2 == 0, k // 2, 0).astype(dtype) * jnp.pi  # couples k and k+1
  return jnp.diag(d, -1) - jnp.diag(d, 1)


# ----------------------------------------------------------------------------------------------
# Normal plus low rank.


def low_rank_correction(measure: str, N: int) -> jax.Array:
  """The ``P`` with ``A + P P^*`` normal (S4 code's ``rank_correction``), real.

  Returns ``P (N,)`` for the rank-1 measures (``"legs"``: ``sqrt(n + 1/2)``; ``"lagt"``:
  ``sqrt(1/2)``; ``"fout"``: FouT's ``B``) and ``P (2, N)`` for ``"legt"``
  (``sqrt((2n+1)/2)`` on odd ``n`` in row 0, on even ``n`` in row 1), in the widest enabled float.
  """
  _checks.one_of("measure", measure, MEASURES_NPLR)
  N = _checks.positive_int("N", N)
  return _low_rank_correction(measure, N)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _low_rank_correction(measure, N):
  q = jnp.arange(N, dtype=_wide_float())
  if measure == "legs":
    return jnp.sqrt(q + 0.5)
  if measure == "lagt":
    return jnp.full((N,), jnp.sqrt(0.5), q.dtype)
  if measure == "fout":
    return _fout_input(N, q.dtype)
  r = jnp.sqrt(q + 0.5)  # legt, rank 2: one row per parity
  odd = jnp.mod(q, 2) == 1
  return jnp.stack([jnp.where(odd, r, 0.0), jnp.where(odd, 0.0, r)])


def _outer_sum(P: jax.Array) -> jax.Array:
  """``P P^*`` for ``P (N,)``, or ``sum_r p_r p_r^*`` for ``P (rank, N)``; ``(N, N)``."""
  P = P[None] if P.ndim == 1 else P
  return jnp.einsum("rn,rm->nm", P, jnp.conj(P))


def nplr(measure: str, N: int):
  """Normal-plus-low-rank form of a HiPPO matrix, S4 Theorem 1 (all ``N`` modes).

  For ``A, B = <measure>(N)``, returns ``Lam, P, B, V`` with

      A = V (diag(Lam) - P P^*) V^*,   B_original = V B,   V unitary,

  where for ``P (rank, N)`` the product ``P P^*`` means ``sum_r p_r p_r^*``. The normal part
  ``A + P0 P0^*`` (``P0`` from :func:`low_rank_correction`) is ``c I + S`` with ``S`` real
  skew-symmetric, so it is diagonalised exactly by the Hermitian ``-i S`` (``eigh``):
  ``Lam = c + i eig(-i S)``, sorted by imaginary part. Conjugate pairs are all kept, so no factor
  of two is needed anywhere downstream.

  Computed in float64/complex128 when x64 is enabled (identity to ~1e-12 relative), else in
  float32/complex64 (~1e-6).

  Args:
    measure: ``"legs"``, ``"legt"`` (rank 2), ``"lagt"`` (defaults of :func:`lagt`) or ``"fout"``.
    N: state size, a positive int.

  Returns:
    ``Lam (N,)``, ``P (N,)`` (``(2, N)`` for ``"legt"``), ``B (N,)``, ``V (N, N)``, all complex.
  """
  _checks.one_of("measure", measure, MEASURES_NPLR)
  N = _checks.positive_int("N", N)
  return _nplr(measure, N)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nplr(measure, N):
  dense = {"legs": _legs, "legt": _legt, "fout": _fout,
           "lagt": lambda N, dtype: _lagt(N, dtype, 0.0, 1.0)}[measure]
  A, B = dense(N, jnp.dtype(_wide_float()))
  P = _low_rank_correction(measure, N)
  normal = A + _outer_sum(P)
  c = jnp.mean(jnp.diag(normal))
  skew = normal - c * jnp.eye(N, dtype=A.dtype)
  skew = 0.5 * (skew - skew.T)  # exactly skew; differs from `normal - c I` by rounding only
  w, V = jnp.linalg.eigh(-1j * skew)
  Lam = c + 1j * w
  Vh = jnp.conj(V.T)
  P = P @ Vh.T  # V^* p for each row p
  return Lam, P, Vh @ B, V


def check_dplr(Lam, P) -> int:
  """Checks a DPLR pair ``Lam (N,)``, ``P (N,) or (rank, N)`` at trace time; returns ``N``."""
  _checks.rank("Lam", Lam, 1, "(N,)")
  _checks.floating("Lam", Lam, allow_complex=True)
  (n,) = _checks.shape_of(Lam)
  _checks.rank("P", P, (1, 2), "(N,) or (rank, N)")
  _checks.floating("P", P, allow_complex=True)
  if _checks.shape_of(P)[-1] != n:
    raise ValueError(f"P must have last dimension {n} to match Lam; "
                     f"got shape {_checks.shape_of(P)}")
  return n


def dplr_matrix(Lam: jax.Array, P: jax.Array) -> jax.Array:
  """The dense ``diag(Lam) - P P^*`` of a DPLR state matrix (in the eigenbasis), ``(N, N)``.

  Args:
    Lam: ``(N,)`` diagonal, real or complex.
    P: ``(N,)`` or ``(rank, N)`` low-rank factor.
  """
  check_dplr(Lam, P)
  return jnp.diag(Lam) - _outer_sum(P)


# ----------------------------------------------------------------------------------------------
# S4D diagonal initialisers (Gu et al. 2022, "On the Parameterization and Initialization of
# Diagonal State Space Models", Section 4).


def s4d_real(N: int) -> jax.Array:
  """S4D-Real: ``A[n] = -(n+1)``, the diagonal of HiPPO-LegS. ``(N,)`` float32."""
  N = _checks.positive_int("N", N)
  return -(jnp.arange(N, dtype=jnp.float32) + 1)


def s4d_lin(N: int) -> jax.Array:
  """S4D-Lin: ``A[n] = -1/2 + i pi n``. ``(N,)`` complex64."""
  N = _checks.positive_int("N", N)
  n = jnp.arange(N, dtype=jnp.float32)
  return (-0.5 + 1j * jnp.pi * n).astype(jnp.complex64)


def s4d_inv(N: int) -> jax.Array:
  """S4D-Inv: ``A[n] = -1/2 + i N/pi (N/(2n+1) - 1)``. ``(N,)`` complex64."""
  N = _checks.positive_int("N", N)
  n = jnp.arange(N, dtype=jnp.float32)
  return (-0.5 + 1j * N / jnp.pi * (N / (2 * n + 1) - 1)).astype(jnp.complex64)
