"""Linear time-invariant SSMs: convolution kernels, FFT causal convolution, and the recurrence.

A discrete SSM ``x_k = Ab x_{k-1} + Bb u_k``, ``y_k = Re(C x_k)`` with ``x_{-1} = 0`` is the causal
convolution ``y = K * u`` with kernel ``K[k] = Re(C Ab^k Bb)`` (S4 paper, eqs. 4-5). Both views are
here: :func:`kernel` / :func:`kernel_dplr` + :func:`causal_conv` (parallel over length) and
:func:`recurrence` / :func:`step` (one step at a time, for generation).

Conventions:
  * The SSM functions (:func:`kernel`, :func:`kernel_dplr`, :func:`recurrence`, :func:`step`) are
    single-input single-output: state ``N``, scalar input per step, ``Ab`` dense ``(N, N)`` or
    diagonal ``(N,)``. ``C`` is used without conjugation and the real part is taken; keep all ``N``
    complex modes (no conjugate-pair halving, so no factor 2).
  * A layer of ``H`` independent SSMs is a ``jax.vmap`` over the first axis of the parameters, e.g.
    ``jax.vmap(kernel, in_axes=(0, 0, 0, None), out_axes=1)(Ab (H, N), Bb (H, N), C (H, N), L)``
    gives ``K (L, H)``, the layout :func:`causal_conv` takes.
  * :func:`causal_conv` is multi-channel itself: ``u (batch, length, channels)`` or
    ``(length, channels)`` with one kernel per channel, ``K (length, channels)``, or ``K (length,)``
    shared by all channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssmax import _checks
from ssmax import discretize
from ssmax import hippo

_HI = lax.Precision.HIGHEST  # small contractions; keep fp32 exact on GPUs (no TF32)


def _check_ssm(Ab, Bb, C) -> tuple[int, bool]:
  """Checks a discrete SSM; returns its state size and whether ``Ab`` is dense."""
  r = _checks.rank("Ab", Ab, (1, 2), "(N,) diagonal or (N, N) dense")
  _checks.floating("Ab", Ab, allow_complex=True)
  n = _checks.shape_of(Ab)[0]
  if r == 2:
    _checks.shape("Ab", Ab, (n, n), "(N, N), square")
  _checks.shape("Bb", Bb, (n,), f"(N,) with N = {n} from Ab")
  _checks.floating("Bb", Bb, allow_complex=True)
  _checks.shape("C", C, (n,), f"(N,) with N = {n} from Ab")
  _checks.floating("C", C, allow_complex=True)
  return n, r == 2


def _apply(Ab: jax.Array, x: jax.Array) -> jax.Array:
  """``Ab x`` for dense ``(N, N)`` or diagonal ``(N,)`` ``Ab``."""
  return jnp.matmul(Ab, x, precision=_HI) if Ab.ndim == 2 else Ab * x


def _dtype(*xs):
  return jnp.result_type(*xs, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Convolution kernels.


def kernel(Ab, Bb, C, L: int) -> jax.Array:
  """SSM convolution kernel ``K[k] = Re(C Ab^k Bb)``, ``k = 0 .. L-1`` (S4 eq. 5).

  Dense ``Ab`` by ``L`` matrix-vector products (``lax.scan``; a reference, O(L N^2)); diagonal
  ``Ab`` through the Vandermonde matrix ``V[k, n] = Ab[n]^k`` (S4D), built by a cumulative product
  so that zero or negative entries of ``Ab`` are exact.

  Args:
    Ab: ``(N, N)`` dense or ``(N,)`` diagonal discrete state matrix, float or complex.
    Bb: ``(N,)`` discrete input vector.
    C: ``(N,)`` output vector.
    L: kernel length, a positive int.

  Returns:
    ``K (L,)``, real, float32 or wider.
  """
  n, dense = _check_ssm(Ab, Bb, C)
  L = _checks.positive_int("L", L)
  dt = _dtype(Ab, Bb, C)
  Ab, Bb, C = (jnp.asarray(x, dt) for x in (Ab, Bb, C))
  if dense:
    def body(x, _):
      return _apply(Ab, x), jnp.real(jnp.dot(C, x, precision=_HI))

    _, K = lax.scan(body, Bb, None, length=L)
    return K
  powers = jnp.cumprod(jnp.concatenate([jnp.ones((1, n), dt), jnp.broadcast_to(Ab, (L - 1, n))]),
                       axis=0)  # (L, N) Vandermonde
  return jnp.real(jnp.matmul(powers, C * Bb, precision=_HI))


def _cauchy(v: jax.Array, denom: jax.Array) -> jax.Array:
  """Cauchy-kernel sum ``sum_n v[..., n] / denom[z, n]`` -> ``(Z, ...)``; ``v (..., N)``."""
  return jnp.einsum("...n,zn->z...", v, 1.0 / denom, precision=_HI)


def _c_tilde(Lam, P, B, C, dt, L, rho_l):
  """``C (I - rho^L Ab^L) (N,)`` for the bilinear ``Ab`` of ``diag(Lam) - P P^*`` (S4 App. C.3).

  ``Ab^L`` by repeated squaring of the dense ``(N, N)`` ``Ab``: O(N^3 log L), once per call.
  """
  Ab, _ = discretize.bilinear(hippo.dplr_matrix(Lam, P), B, dt)
  return C - rho_l * jnp.matmul(C, jnp.linalg.matrix_power(Ab, L), precision=_HI)


# The generating function is sampled on the circle |z| = rho with rho^L = 1/2 (see kernel_dplr).
_RHO_POW_L = 0.5


def kernel_dplr(Lam, P, B, C, dt, L: int) -> jax.Array:
  """Kernel of the bilinear-discretised DPLR SSM ``A = diag(Lam) - P P^*``, S4 Algorithm 1.

  Equals ``kernel(*discretize.bilinear(diag(Lam) - P P^*, B, dt), C, L)`` without powering ``Ab``
  step by step. The truncated generating function ``K^(z) = sum_{k<L} C Ab^k Bb z^k`` is evaluated
  on ``L`` points ``z_j = rho exp(-2 pi i j / L)``, where ``z^L = rho^L`` (S4 Appendix C.3):

      K^(z) = C~ (I - z Ab)^{-1} Bb = dt C~ ((1 - z) I - (1 + z) dt/2 A)^{-1} B,
      C~    = C (I - rho^L Ab^L).

  This is S4's ``2/(1+z) C~ (g(z) - A)^{-1} B`` with ``g(z) = 2/dt (1-z)/(1+z)``, multiplied through
  by ``(1+z) dt/2`` so that ``z = -1`` stays finite. With ``D(z) = (1 - z) - (1 + z) dt/2 Lam`` and
  ``s = (1 + z) dt/2``, the Woodbury identity turns the inverse into Cauchy sums
  ``k_xy(z) = sum_n x_n y_n / D_n(z)`` (S4 Appendix C.3):

      K^(z) = dt [k_{C~,B} - s k_{C~,P} (I + s k_{P^*,P})^{-1} k_{P^*,B}],

  and ``K[k] = Re(ifft(K^)[k]) / rho^k``. S4 samples the unit circle (``rho = 1``); here
  ``rho^L = 1/2``. ``D_n(z)`` vanishes where ``z`` is the inverse of a bilinear-discretised
  ``Lam_n``, which lies on the unit circle when ``Re(Lam_n) = 0`` — as for the skew-symmetric
  normal parts of LegT and FouT, whose zero eigenvalues put a pole exactly at ``z = 1``. Inside the
  unit circle every ``D_n`` with ``Re(Lam_n) <= 0`` is nonzero, at the price of at most a factor 2
  on rounding errors. ``A`` itself must be stable (spectral radius of ``Ab`` at most 1).

  Args:
    Lam: ``(N,)`` diagonal of the normal part, complex (or real), ``Re(Lam) <= 0``.
    P: ``(N,)`` rank-1 or ``(rank, N)`` low-rank factor (``P P^* = sum_r p_r p_r^*``).
    B: ``(N,)`` continuous input vector.
    C: ``(N,)`` output vector.
    dt: scalar step.
    L: kernel length, a positive int.

  Returns:
    ``K (L,)``, real, float32 (float64 for complex128 inputs).
  """
  n = hippo.check_dplr(Lam, P)
  _checks.shape("B", B, (n,), f"(N,) with N = {n} from Lam")
  _checks.floating("B", B, allow_complex=True)
  _checks.shape("C", C, (n,), f"(N,) with N = {n} from Lam")
  _checks.floating("C", C, allow_complex=True)
  if not isinstance(dt, (int, float)) or isinstance(dt, bool):
    _checks.rank("dt", dt, 0, "(a scalar)")
    _checks.floating("dt", dt)
  L = _checks.positive_int("L", L)
  cdt = jnp.result_type(Lam, P, B, C, dt, jnp.complex64)
  rdt = jnp.finfo(cdt).dtype
  Lam, P, B, C = (jnp.asarray(x, cdt) for x in (Lam, P, B, C))
  dt = jnp.asarray(dt, rdt)
  P = P[None] if P.ndim == 1 else P  # (rank, N)
  Ct = _c_tilde(Lam, P, B, C, dt, L, _RHO_POW_L)

  k = jnp.arange(L, dtype=rdt)
  rho_k = _RHO_POW_L ** (k / L)  # rho^k
  z = _RHO_POW_L ** (1 / L) * jnp.exp(-2j * jnp.pi * k / L).astype(cdt)  # (L,)
  s = (1 + z) * dt / 2
  denom = (1 - z)[:, None] - s[:, None] * Lam[None, :]  # D_n(z), (L, N)
  Pc = jnp.conj(P)
  k00 = _cauchy(Ct * B, denom)  # (L,)
  k01 = _cauchy(Ct * P, denom)  # (L, rank)
  k10 = _cauchy(Pc * B, denom)  # (L, rank)
  k11 = _cauchy(Pc[:, None, :] * P[None, :, :], denom)  # (L, rank, rank)
  eye = jnp.eye(P.shape[0], dtype=cdt)
  corr = jnp.linalg.solve(eye + s[:, None, None] * k11, k10[..., None])[..., 0]  # (L, rank)
  khat = dt * (k00 - s * jnp.sum(k01 * corr, axis=-1))
  return jnp.real(jnp.fft.ifft(khat)) / rho_k


# ----------------------------------------------------------------------------------------------
# The convolutional view.


def after(tree, dep):
  """``tree`` with a data dependency on ``dep``: each float leaf plus ``0 * dep[0, ..., 0]``.

  Values are unchanged while ``dep``'s first element is finite. Used to make a kernel's FFT wait
  for the layer's input: XLA's CPU runtime runs FFTs without a data path between them at once,
  and two ducc FFTs of length >= 2048 at once can wait forever on each other in a 2-thread pool
  (issue 18, defect 11). The zero is kept: XLA does not fold ``x * 0`` for floats (NaN), and a
  gradient flows back through it, so the backward's FFTs are ordered the same way.
  """
  zero = 0 * jnp.real(dep.reshape(-1)[0])
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(
      x.dtype, jnp.inexact) else x, tree)


def causal_conv(u, K) -> jax.Array:
  """Causal convolution ``y[t] = sum_{k <= t} K[k] u[t - k]`` along the length axis, by FFT.

  Both signals are zero-padded to ``length + taps - 1`` before the FFT, so nothing wraps around.

  The kernel's and the input's forward transforms are one FFT of the two stacked along the batch
  axis, so every FFT of a stack of layers depends on the one before it. XLA's CPU runtime runs
  independent FFTs at once, and two ducc FFTs of length >= 2048 at once can wait forever on each
  other in a 2-thread pool: a multi-layer S4D model hung on a 2-core CPU (issue 18, defect 11).

  Args:
    u: ``(batch, length, channels)`` or ``(length, channels)``, real float.
    K: ``(taps, channels)`` one kernel per channel, or ``(taps,)`` shared; real float. Taps past
      ``length`` have no effect.

  Returns:
    ``y`` with ``u``'s shape, in the common dtype of ``u`` and ``K`` (computed in at least float32).
  """
  _checks.rank("u", u, (2, 3), "(batch, length, channels) or (length, channels)")
  _checks.floating("u", u)
  l, h = _checks.shape_of(u)[-2:]
  if l < 1:
    raise ValueError(f"u must have length >= 1 along axis -2; got shape {_checks.shape_of(u)}")
  rk = _checks.rank("K", K, (1, 2), "(length,) or (length, channels)")
  _checks.floating("K", K)
  if rk == 2 and _checks.shape_of(K)[1] != h:
    raise ValueError(f"K must have shape (length, {h}) to match u's {h} channels; "
                     f"got {_checks.shape_of(K)}")
  if _checks.shape_of(K)[0] < 1:
    raise ValueError(f"K must have at least one tap; got shape {_checks.shape_of(K)}")
  out_dtype = jnp.result_type(u, K)
  work = jnp.result_type(out_dtype, jnp.float32)
  K = K[:l].astype(work)
  K = K[:, None] if rk == 1 else K
  n = l + K.shape[0] - 1
  u = u.astype(work)
  batch = u.shape[:-2]
  K = jnp.pad(jnp.broadcast_to(K, (K.shape[0], h)), ((0, l - K.shape[0]), (0, 0)))[None]
  both = jnp.fft.rfft(jnp.concatenate([u.reshape(-1, l, h), K]), n=n, axis=-2)
  uf, kf = both[:-1], both[-1]
  y = jnp.fft.irfft(uf * kf, n=n, axis=-2)[..., :l, :].reshape(*batch, l, h)
  return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# The recurrent view.


def _step(Ab, Bb, C, x, u_t):
  x = _apply(Ab, x) + Bb * u_t
  return jnp.real(jnp.dot(C, x, precision=_HI)), x


def step(Ab, Bb, C, x, u_t) -> tuple[jax.Array, jax.Array]:
  """One recurrent step ``x' = Ab x + Bb u_t``, ``y_t = Re(C x')`` (S4 eq. 3).

  Args:
    Ab: ``(N, N)`` dense or ``(N,)`` diagonal discrete state matrix.
    Bb: ``(N,)``; C: ``(N,)``.
    x: ``(N,)`` state before the step.
    u_t: scalar real input.

  Returns:
    ``(y_t, x')``: scalar real output and ``(N,)`` new state (dtype common to the SSM and ``x``).
  """
  n, _ = _check_ssm(Ab, Bb, C)
  _checks.shape("x", x, (n,), f"(N,) with N = {n} from Ab")
  _checks.floating("x", x, allow_complex=True)
  _checks.rank("u_t", u_t, 0, "(a scalar)")
  _checks.floating("u_t", u_t)
  dt = _dtype(Ab, Bb, C, x)
  return _step(*(jnp.asarray(a, dt) for a in (Ab, Bb, C, x)), u_t)


def recurrence(Ab, Bb, C, u, x0=None) -> tuple[jax.Array, jax.Array]:
  """Runs the SSM over a sequence with ``lax.scan`` (S4 eq. 3, the recurrent view).

  ``x_k = Ab x_{k-1} + Bb u_k``, ``y_k = Re(C x_k)``, ``x_{-1} = x0`` (default zero). With
  ``x0 = 0`` this equals ``causal_conv(u[:, None], kernel(Ab, Bb, C, length))[:, 0]``.

  Args:
    Ab: ``(N, N)`` dense or ``(N,)`` diagonal discrete state matrix.
    Bb: ``(N,)``; C: ``(N,)``.
    u: ``(length,)`` real input, ``length >= 1``.
    x0: optional ``(N,)`` initial state.

  Returns:
    ``(y, x_last)``: ``y (length,)`` real and the state after the last step ``(N,)``.
  """
  n, _ = _check_ssm(Ab, Bb, C)
  _checks.rank("u", u, 1, "(length,)")
  _checks.floating("u", u)
  if _checks.shape_of(u)[0] < 1:
    raise ValueError(f"u must have length >= 1; got shape {_checks.shape_of(u)}")
  if x0 is not None:
    _checks.shape("x0", x0, (n,), f"(N,) with N = {n} from Ab")
    _checks.floating("x0", x0, allow_complex=True)
  dt = _dtype(Ab, Bb, C) if x0 is None else _dtype(Ab, Bb, C, x0)
  Ab, Bb, C = (jnp.asarray(a, dt) for a in (Ab, Bb, C))
  x0 = jnp.zeros((n,), dt) if x0 is None else jnp.asarray(x0, dt)

  def body(x, u_t):
    y_t, x = _step(Ab, Bb, C, x, u_t)
    return x, y_t

  x_last, y = lax.scan(body, x0, u)
  return y, x_last
