"""ssmax.hippo against closed forms written as float64 NumPy loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmax import hippo


def legs_ref(N):
  A = np.zeros((N, N))
  for n in range(N):
    for k in range(N):
      if n > k:
        A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
      elif n == k:
        A[n, k] = -(n + 1)
  return A, np.sqrt(2 * np.arange(N) + 1.0)


def legt_ref(N):
  A = np.zeros((N, N))
  for n in range(N):
    for k in range(N):
      sign = (-1.0) ** (n - k) if n < k else 1.0
      A[n, k] = -0.5 * math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) * sign
  return A, 0.5 * np.sqrt(2 * np.arange(N) + 1.0)


def lagt_ref(N, alpha=0.0, beta=1.0):
  A = np.zeros((N, N))
  B = np.zeros(N)
  w = [math.sqrt(math.gamma(n + alpha + 1) / math.gamma(n + 1)) for n in range(N)]
  for n in range(N):
    for k in range(N):
      if n == k:
        A[n, k] = -(1 + beta) / 2
      elif n > k:
        A[n, k] = -w[k] / w[n]
    binom = math.gamma(n + alpha + 1) / (math.gamma(n + 1) * math.gamma(alpha + 1))
    B[n] = binom / w[n] * beta ** ((1 - alpha) / 2) / math.sqrt(math.gamma(1 - alpha))
  return A, B


def fout_ref(N):
  """S4's construction (defined for even N); odd N is the leading block of N + 1."""
  M = N + (N % 2)
  freqs = np.arange(M // 2)
  d = np.stack([np.zeros(M // 2), freqs], axis=-1).reshape(-1)[1:]
  A = np.pi * (-np.diag(d, 1) + np.diag(d, -1))
  B = np.zeros(M)
  B[0::2] = 2**0.5
  B[0] = 1
  A = A - B[:, None] * B[None, :]
  return A[:N, :N], B[:N]


REFS = {"legs": legs_ref, "legt": legt_ref, "lagt": lagt_ref, "fout": fout_ref}


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt", "fout"])
@pytest.mark.parametrize("N", [3, 8])
def test_dense_matches_closed_form(measure, N):
  A_ref, B_ref = REFS[measure](N)
  A, B = getattr(hippo, measure)(N)
  assert A.shape == (N, N) and B.shape == (N,)
  assert A.dtype == jnp.float32 and B.dtype == jnp.float32
  np.testing.assert_allclose(A, A_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(B, B_ref, rtol=1e-6, atol=1e-6)
  with jax.enable_x64(True):
    A, B = getattr(hippo, measure)(N, dtype=jnp.float64)
    assert A.dtype == jnp.float64
    np.testing.assert_allclose(A, A_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(B, B_ref, rtol=1e-13, atol=1e-13)


def test_legs_small_case_by_hand():
  A, B = hippo.legs(3)
  s3, s5, s15 = math.sqrt(3), math.sqrt(5), math.sqrt(15)
  np.testing.assert_allclose(A, [[-1, 0, 0], [-s3, -2, 0], [-s5, -s15, -3]], rtol=1e-6)
  np.testing.assert_allclose(B, [1, s3, s5], rtol=1e-6)


def test_lagt_default_is_lower_triangular_ones():
  A, B = hippo.lagt(5)
  np.testing.assert_array_equal(A, -np.tril(np.ones((5, 5))))
  np.testing.assert_array_equal(B, np.ones(5))


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (-0.3, 0.2), (0.0, 0.01)])
def test_lagt_generalised(alpha, beta):
  A_ref, B_ref = lagt_ref(7, alpha, beta)
  with jax.enable_x64(True):
    A, B = hippo.lagt(7, alpha=alpha, beta=beta, dtype=jnp.float64)
    np.testing.assert_allclose(A, A_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B, B_ref, rtol=1e-12, atol=1e-12)


def test_fout_even_equals_s4_and_odd_is_leading_block():
  A6, B6 = hippo.fout(6)
  A5, B5 = hippo.fout(5)
  np.testing.assert_array_equal(A5, A6[:5, :5])
  np.testing.assert_array_equal(B5, B6[:5])
  # the rotation of the (cos 1, sin 1) pair at indices 2, 3
  np.testing.assert_allclose(A6[3, 2] - A6[2, 3], 2 * np.pi, rtol=1e-6)


def _relative(x, ref):
  return np.max(np.abs(np.asarray(x) - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt", "fout"])
@pytest.mark.parametrize("N", [3, 7, 8])
def test_nplr_identity_float64(measure, N):
  A_ref, B_ref = REFS[measure](N)
  with jax.enable_x64(True):
    Lam, P, B, V = hippo.nplr(measure, N)
    Lam, P, B, V = (np.asarray(x) for x in (Lam, P, B, V))
  assert Lam.dtype == np.complex128 and V.dtype == np.complex128
  assert Lam.shape == (N,) and B.shape == (N,) and V.shape == (N, N)
  assert P.shape == ((2, N) if measure == "legt" else (N,))
  P2 = np.atleast_2d(P)
  inner = np.diag(Lam) - sum(np.outer(p, p.conj()) for p in P2)
  assert _relative(V @ inner @ V.conj().T, A_ref) < 1e-10
  assert _relative(V @ B, B_ref) < 1e-10
  np.testing.assert_allclose(V.conj().T @ V, np.eye(N), atol=1e-12)
  # the normal part is c I + skew: one common real part, sorted imaginary parts
  np.testing.assert_allclose(Lam.real, Lam.real[0], atol=1e-12)
  assert np.all(np.diff(Lam.imag) >= -1e-12)
  # its eigenvalues are those of A + P0 P0^T, computed independently by NumPy
  P0 = np.atleast_2d(np.asarray(hippo.low_rank_correction(measure, N)))
  eig = np.linalg.eigvals(A_ref + P0.T @ P0)
  np.testing.assert_allclose(np.sort(eig.imag), Lam.imag, atol=1e-9)


def test_nplr_legs_real_part_and_float32_precision():
  N = 7
  Lam, P, B, V = hippo.nplr("legs", N)
  assert Lam.dtype == jnp.complex64
  np.testing.assert_allclose(np.real(Lam), -0.5, atol=1e-6)
  A_ref, _ = legs_ref(N)
  recon = V @ hippo.dplr_matrix(Lam, P) @ jnp.conj(V.T)
  assert _relative(recon, A_ref) < 1e-5


def test_dplr_matrix_rank2():
  rng = np.random.default_rng()
  Lam = rng.normal(size=5) + 1j * rng.normal(size=5)
  P = rng.normal(size=(2, 5)) + 1j * rng.normal(size=(2, 5))
  ref = np.diag(Lam) - np.outer(P[0], P[0].conj()) - np.outer(P[1], P[1].conj())
  np.testing.assert_allclose(hippo.dplr_matrix(jnp.asarray(Lam, jnp.complex64),
                                               jnp.asarray(P, jnp.complex64)), ref, rtol=1e-5,
                             atol=1e-5)


def test_s4d_initialisers():
  N = 7
  n = np.arange(N)
  real = hippo.s4d_real(N)
  lin = hippo.s4d_lin(N)
  inv = hippo.s4d_inv(N)
  assert real.dtype == jnp.float32 and lin.dtype == jnp.complex64 and inv.dtype == jnp.complex64
  assert real.shape == lin.shape == inv.shape == (N,)
  np.testing.assert_array_equal(real, -(n + 1.0))
  np.testing.assert_allclose(lin, -0.5 + 1j * np.pi * n, rtol=1e-6)
  np.testing.assert_allclose(inv, -0.5 + 1j * N / np.pi * (N / (2 * n + 1) - 1), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# One test per error message.


@pytest.mark.parametrize("fn", [hippo.legs, hippo.legt, hippo.lagt, hippo.fout, hippo.s4d_real,
                                hippo.s4d_lin, hippo.s4d_inv])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_N(fn, bad):
  with pytest.raises(ValueError, match="N must be a positive integer"):
    fn(bad)


def test_bad_dtype():
  with pytest.raises(ValueError, match="dtype must be a floating-point dtype; got int32"):
    hippo.legs(3, dtype=jnp.int32)


def test_bad_alpha():
  with pytest.raises(ValueError, match="alpha must satisfy -1 < alpha < 1; got 1.5"):
    hippo.lagt(3, alpha=1.5)


def test_bad_beta():
  with pytest.raises(ValueError, match="beta must be > 0; got 0.0"):
    hippo.lagt(3, beta=0.0)


def test_unknown_measure():
  with pytest.raises(ValueError, match="measure must be one of .*'legs'.*; got 'legx'"):
    hippo.nplr("legx", 4)
  with pytest.raises(ValueError, match="measure must be one of"):
    hippo.low_rank_correction("foo", 4)


def test_nplr_bad_N():
  with pytest.raises(ValueError, match="N must be a positive integer; got 0"):
    hippo.nplr("legs", 0)


def test_dplr_matrix_errors():
  Lam = jnp.ones(3, jnp.complex64)
  with pytest.raises(ValueError, match=r"Lam must have rank 1 \(N,\); got shape \(3, 3\)"):
    hippo.dplr_matrix(jnp.ones((3, 3)), jnp.ones(3))
  with pytest.raises(ValueError, match="Lam must have a floating or complex dtype; got int32"):
    hippo.dplr_matrix(jnp.ones(3, jnp.int32), jnp.ones(3))
  with pytest.raises(ValueError, match=r"P must have rank 1 or 2 .*; got shape \(1, 2, 3\)"):
    hippo.dplr_matrix(Lam, jnp.ones((1, 2, 3)))
  with pytest.raises(ValueError, match="P must have a floating or complex dtype; got int32"):
    hippo.dplr_matrix(Lam, jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match=r"P must have last dimension 3 to match Lam; got shape \(4,\)"):
    hippo.dplr_matrix(Lam, jnp.ones(4))
