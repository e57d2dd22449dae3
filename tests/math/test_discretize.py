"""ssmax.discretize against scipy.signal.cont2discrete / scipy.linalg.expm and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.signal

from ssmax import discretize, hippo

zoh = jax.jit(discretize.zoh)
bilinear = jax.jit(discretize.bilinear)


def _scipy(A, B, dt, method):
  n = A.shape[0]
  Ad, Bd, *_ = scipy.signal.cont2discrete((A, B[:, None], np.eye(n), np.zeros((n, 1))), dt,
                                          method=method)
  return Ad, Bd[:, 0]


def _stable(rng, n):
  return rng.normal(size=(n, n)) / np.sqrt(n) - 1.5 * np.eye(n)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("n", [3, 7])
def test_dense_matches_scipy(method, n, rng):
  A, B, dt = _stable(rng, n), rng.normal(size=n), rng.uniform(0.01, 0.5)
  Ad, Bd = _scipy(A, B, dt, method)
  fn = zoh if method == "zoh" else bilinear
  Ab, Bb = fn(jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32), dt)
  assert Ab.shape == (n, n) and Bb.shape == (n,) and Ab.dtype == jnp.float32
  np.testing.assert_allclose(Ab, Ad, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(Bb, Bd, rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    Ab, Bb = fn(A, B, dt)
    assert Ab.dtype == jnp.float64
    np.testing.assert_allclose(Ab, Ad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Bb, Bd, rtol=1e-12, atol=1e-12)


def test_zoh_dense_singular_hippo_fout(rng):
  """FouT has a zero eigenvalue; ZOH must not invert A. Reference: expm and its integral by
  the series sum_k (dt A)^k dt / (k+1)!, both in float64."""
  n, dt = 5, 0.05
  with jax.enable_x64(True):
    A, B = (np.asarray(x) for x in hippo.fout(n, dtype=jnp.float64))
    Ab, Bb = zoh(A, B, dt)
  assert abs(np.linalg.det(A + np.outer(B, B))) < 1e-12  # normal part singular
  term, integral = np.eye(n) * dt, np.zeros((n, n))
  for k in range(1, 40):
    integral += term
    term = term @ (dt * A) / (k + 1)
  np.testing.assert_allclose(Ab, scipy.linalg.expm(dt * A), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(Bb, integral @ B, rtol=1e-12, atol=1e-12)


def test_zoh_zero_matrix():
  Ab, Bb = zoh(jnp.zeros((3, 3)), jnp.arange(3.0), 0.25)
  np.testing.assert_allclose(Ab, np.eye(3), atol=1e-7)
  np.testing.assert_allclose(Bb, 0.25 * np.arange(3.0), rtol=1e-6)


@pytest.mark.parametrize("cplx", [False, True])
def test_diagonal_matches_closed_form(cplx, rng):
  n = 7
  A = -rng.uniform(0.1, 3, size=n) + (1j * rng.normal(size=n) * 5 if cplx else 0)
  B = rng.normal(size=n) + (1j * rng.normal(size=n) if cplx else 0)
  dt = rng.uniform(0.01, 0.5)
  zoh_ref = (np.exp(dt * A), (np.exp(dt * A) - 1) / A * B)
  bil_ref = ((1 + dt / 2 * A) / (1 - dt / 2 * A), dt * B / (1 - dt / 2 * A))
  dtype = jnp.complex64 if cplx else jnp.float32
  for fn, (Ad, Bd) in ((zoh, zoh_ref), (bilinear, bil_ref)):
    Ab, Bb = fn(jnp.asarray(A, dtype), jnp.asarray(B, dtype), dt)
    assert Ab.shape == (n,) and Ab.dtype == dtype and Bb.dtype == dtype
    np.testing.assert_allclose(Ab, Ad, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(Bb, Bd, rtol=2e-5, atol=2e-6)
    with jax.enable_x64(True):
      Ab, Bb = fn(A, B, dt)
      np.testing.assert_allclose(Ab, Ad, rtol=1e-13, atol=1e-13)
      np.testing.assert_allclose(Bb, Bd, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_diagonal_equals_dense_of_diag(method, rng):
  n = 5
  A, B = -rng.uniform(0.1, 3, size=n), rng.normal(size=n)
  dt = np.float32(0.1)
  fn = zoh if method == "zoh" else bilinear
  Ab, Bb = fn(jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32), dt)
  Ad, Bd = fn(jnp.diag(jnp.asarray(A, jnp.float32)), jnp.asarray(B, jnp.float32), dt)
  np.testing.assert_allclose(jnp.diag(Ab), Ad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(Bb, Bd, rtol=1e-5, atol=1e-6)


def test_zoh_diagonal_zero_eigenvalue_value_and_gradient():
  A = jnp.array([0.0, -1.0, 0.0 + 0.0j, -0.5 + 2j])
  B = jnp.ones(4, jnp.complex64)
  dt = 0.3
  Ab, Bb = zoh(A, B, dt)
  np.testing.assert_allclose(Bb[0], dt, rtol=1e-6)
  np.testing.assert_allclose(Bb[2], dt, rtol=1e-6)
  np.testing.assert_allclose(Bb[3], (np.exp(dt * (-0.5 + 2j)) - 1) / (-0.5 + 2j), rtol=1e-5)
  # d Bb / d a at a = 0 is dt^2 / 2 (from dt * (1 + dt a / 2 + ...)); no NaN from the safe branch
  g = jax.grad(lambda a: discretize.zoh(a, jnp.ones(1), dt)[1][0])(jnp.zeros(1))
  np.testing.assert_allclose(g, [dt**2 / 2], rtol=1e-5)


def test_diagonal_per_state_dt(rng):
  A = -rng.uniform(0.1, 3, size=5)
  dt = rng.uniform(0.01, 0.5, size=5)
  Ab, Bb = zoh(jnp.asarray(A, jnp.float32), jnp.ones(5), jnp.asarray(dt, jnp.float32))
  np.testing.assert_allclose(Ab, np.exp(dt * A), rtol=1e-6)
  np.testing.assert_allclose(Bb, np.expm1(dt * A) / A, rtol=1e-5)


def test_vmap_over_channels(rng):
  H, n = 5, 3
  A = -rng.uniform(0.1, 3, size=(H, n))
  dt = rng.uniform(0.01, 0.5, size=H)
  Ab, Bb = jax.vmap(discretize.zoh)(jnp.asarray(A, jnp.float32), jnp.ones((H, n)),
                                    jnp.asarray(dt, jnp.float32))
  assert Ab.shape == (H, n)
  np.testing.assert_allclose(Ab, np.exp(dt[:, None] * A), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# One test per error message.

FNS = [discretize.zoh, discretize.bilinear]


@pytest.mark.parametrize("fn", FNS)
def test_A_rank(fn):
  with pytest.raises(ValueError, match=r"A must have rank 1 or 2 .*; got shape \(2, 3, 3\)"):
    fn(jnp.ones((2, 3, 3)), jnp.ones(3), 0.1)


@pytest.mark.parametrize("fn", FNS)
def test_A_square(fn):
  with pytest.raises(ValueError, match=r"A must have shape \(3, 3\) \(N, N\), square; got \(3, 4\)"):
    fn(jnp.ones((3, 4)), jnp.ones(3), 0.1)


@pytest.mark.parametrize("fn", FNS)
def test_A_dtype(fn):
  with pytest.raises(ValueError, match="A must have a floating or complex dtype; got int32"):
    fn(jnp.ones(3, jnp.int32), jnp.ones(3), 0.1)


@pytest.mark.parametrize("fn", FNS)
def test_B_shape(fn):
  with pytest.raises(ValueError, match=r"B must have shape \(3,\) \(N,\) with N = 3 from A; got \(4,\)"):
    fn(jnp.ones((3, 3)), jnp.ones(4), 0.1)


@pytest.mark.parametrize("fn", FNS)
def test_B_dtype(fn):
  with pytest.raises(ValueError, match="B must have a floating or complex dtype; got int32"):
    fn(jnp.ones(3), jnp.ones(3, jnp.int32), 0.1)


@pytest.mark.parametrize("fn", FNS)
def test_dt_dtype(fn):
  with pytest.raises(ValueError, match="dt must have a floating-point dtype; got int32"):
    fn(jnp.ones(3), jnp.ones(3), jnp.ones((), jnp.int32))


@pytest.mark.parametrize("fn", FNS)
def test_dt_dense_scalar(fn):
  with pytest.raises(ValueError, match=r"dt must have rank 0 \(a scalar, for dense A\); got shape \(3,\)"):
    fn(jnp.ones((3, 3)), jnp.ones(3), jnp.ones(3))


@pytest.mark.parametrize("fn", FNS)
def test_dt_diagonal_shape(fn):
  with pytest.raises(ValueError, match=r"dt must be a scalar or have shape \(1,\) or \(3,\) for diagonal A; got shape \(4,\)"):
    fn(jnp.ones(3), jnp.ones(3), jnp.ones(4))
