"""ssmax.lti against float64 NumPy loops and np.convolve; convolutional == recurrent view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmax import discretize, hippo, lti

L = 37
kernel = jax.jit(lti.kernel, static_argnums=3)
kernel_dplr = jax.jit(lti.kernel_dplr, static_argnums=5)
causal_conv = jax.jit(lti.causal_conv)
recurrence = jax.jit(lti.recurrence)
bilinear = jax.jit(discretize.bilinear)


def kernel_ref(Ab, Bb, C, L):
  """K[k] = Re(C Ab^k Bb) by a float64 power loop."""
  Ab = np.diag(Ab) if Ab.ndim == 1 else Ab
  x, K = np.asarray(Bb, np.complex128), []
  for _ in range(L):
    K.append((np.asarray(C) @ x).real)
    x = Ab @ x
  return np.array(K)


def bilinear_ref(A, B, dt):
  eye = np.eye(A.shape[0])
  inv = np.linalg.inv(eye - dt / 2 * A)
  return inv @ (eye + dt / 2 * A), inv @ (dt * B)


def conv_ref(u, K):
  """u (..., length, channels), K (taps, channels): np.convolve per channel, truncated."""
  u = np.asarray(u, np.float64)
  y = np.zeros_like(u)
  l = u.shape[-2]
  for idx in np.ndindex(*u.shape[:-2]):
    for c in range(u.shape[-1]):
      y[idx + (slice(None), c)] = np.convolve(u[idx + (slice(None), c)], K[:, c])[:l]
  return y


def rel(x, ref):
  return np.max(np.abs(np.asarray(x) - ref)) / np.max(np.abs(ref))


def random_ssm(rng, n, dense, cplx):
  if dense:
    Ab = rng.normal(size=(n, n)) * 0.9 / np.sqrt(n)
    if cplx:
      Ab = Ab + 1j * rng.normal(size=(n, n)) * 0.3 / np.sqrt(n)
  else:
    Ab = rng.uniform(-0.95, 0.95, size=n)  # zero and negative entries included by chance
    if cplx:
      Ab = Ab * np.exp(1j * rng.uniform(-np.pi, np.pi, size=n))
  Bb, C = rng.normal(size=n), rng.normal(size=n)
  if cplx:
    Bb, C = Bb + 1j * rng.normal(size=n), C + 1j * rng.normal(size=n)
  return Ab, Bb, C


def as32(*xs):
  return tuple(jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32) for x in xs)


# ------------------------------------------------------------------------------------------------
# Kernels.


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("cplx", [False, True])
def test_kernel_matches_power_loop(dense, cplx, rng):
  n = 5
  Ab, Bb, C = random_ssm(rng, n, dense, cplx)
  ref = kernel_ref(Ab, Bb, C, L)
  K = kernel(*as32(Ab, Bb, C), L)
  assert K.shape == (L,) and K.dtype == jnp.float32
  assert rel(K, ref) < 1e-5
  with jax.enable_x64(True):
    K = kernel(Ab, Bb, C, L)
    assert K.dtype == jnp.float64 and rel(K, ref) < 1e-12


def test_kernel_diagonal_exact_zero_and_negative():
  K = kernel(jnp.array([0.0, -0.5, 1.0]), jnp.ones(3), jnp.ones(3), 5)
  np.testing.assert_allclose(K, [3, 0.5, 1.25, 0.875, 1.0625], rtol=1e-6)


def test_kernel_vmap_over_channels(rng):
  H, n = 5, 3
  Ab, Bb, C = (rng.uniform(-0.9, 0.9, size=(H, n)) for _ in range(3))
  K = jax.vmap(lti.kernel, in_axes=(0, 0, 0, None), out_axes=1)(*as32(Ab, Bb, C), L)
  assert K.shape == (L, H)
  for h in range(H):
    assert rel(K[:, h], kernel_ref(Ab[h], Bb[h], C[h], L)) < 1e-5


@pytest.mark.parametrize("measure,length", [(m, l) for m in ("legs", "legt", "lagt", "fout")
                                            for l in (L, 36)] + [("legs", 1), ("legt", 2)])
def test_kernel_dplr_float64(measure, length, rng):
  """Cauchy + Woodbury route == bilinear + power loop, to float64 precision."""
  n, dt = 7, rng.uniform(0.01, 0.3)
  with jax.enable_x64(True):
    Lam, P, B, _ = (np.asarray(x) for x in hippo.nplr(measure, n))
    C = rng.normal(size=n) + 1j * rng.normal(size=n)
    K = kernel_dplr(Lam, P, B, C, dt, length)
    assert K.shape == (length,) and K.dtype == jnp.float64
  P2 = np.atleast_2d(P)
  A = np.diag(Lam) - P2.T @ P2.conj()
  ref = kernel_ref(*bilinear_ref(A, B, dt), C, length)
  assert rel(K, ref) < 1e-10


def test_kernel_dplr_random_rank2_complex(rng):
  n, dt = 5, 0.2
  Lam = -rng.uniform(0.1, 1, size=n) + 1j * rng.normal(size=n) * 3
  P = (rng.normal(size=(2, n)) + 1j * rng.normal(size=(2, n))) * 0.5
  B, C = (rng.normal(size=n) + 1j * rng.normal(size=n) for _ in range(2))
  A = np.diag(Lam) - P.T @ P.conj()
  assert np.max(np.abs(np.linalg.eigvals(bilinear_ref(A, B, dt)[0]))) < 1
  ref = kernel_ref(*bilinear_ref(A, B, dt), C, L)
  with jax.enable_x64(True):
    assert rel(kernel_dplr(Lam, P, B, C, dt, L), ref) < 1e-10
  assert rel(kernel_dplr(*as32(Lam, P, B, C), dt, L), ref) < 2e-5


def test_kernel_dplr_equals_bilinear_then_kernel_float32(rng):
  n, dt = 7, 0.05
  Lam, P, B, _ = hippo.nplr("legs", n)
  C = jnp.asarray(rng.normal(size=n) + 1j * rng.normal(size=n), jnp.complex64)
  K = kernel_dplr(Lam, P, B, C, dt, L)
  assert K.dtype == jnp.float32
  K2 = kernel(*bilinear(hippo.dplr_matrix(Lam, P), B, dt), C, L)
  assert rel(K, np.asarray(K2)) < 2e-5


def test_kernel_dplr_gradient_matches_finite_differences(rng):
  """Training an S4 layer differentiates through the Cauchy route; check d/d dt and d/d Lam."""
  n = 5
  w = rng.normal(size=L)
  with jax.enable_x64(True):
    Lam, P, B, _ = hippo.nplr("legs", n)
    C = jnp.asarray(rng.normal(size=n) + 1j * rng.normal(size=n))
    loss = jax.jit(lambda dt, lam: jnp.dot(w, lti.kernel_dplr(lam, P, B, C, dt, L)))
    g_dt, g_lam = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.1, Lam)
    eps = 1e-6
    fd_dt = (loss(0.1 + eps, Lam) - loss(0.1 - eps, Lam)) / (2 * eps)
    e = jnp.zeros(n).at[2].set(eps)
    fd_re = (loss(0.1, Lam + e) - loss(0.1, Lam - e)) / (2 * eps)
  np.testing.assert_allclose(g_dt, fd_dt, rtol=1e-6)
  np.testing.assert_allclose(np.real(g_lam[2]), fd_re, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Causal convolution.


@pytest.mark.parametrize("u_shape", [(2, L, 5), (L, 5)])
@pytest.mark.parametrize("k_shape", [(L, 5), (L,), (4, 5), (L + 6,)])
def test_causal_conv_matches_np_convolve(u_shape, k_shape, rng):
  u = rng.normal(size=u_shape)
  K = rng.normal(size=k_shape)
  K2 = np.broadcast_to(K[:, None], (k_shape[0], 5)) if K.ndim == 1 else K
  ref = conv_ref(u, K2)
  y = causal_conv(*as32(u, K))
  assert y.shape == u_shape and y.dtype == jnp.float32
  assert rel(y, ref) < 1e-5
  with jax.enable_x64(True):
    y = causal_conv(u, K)
    assert y.dtype == jnp.float64 and rel(y, ref) < 1e-12


def test_causal_conv_is_causal(rng):
  u = rng.normal(size=(L, 5)).astype(np.float32)
  K = rng.normal(size=(L, 5)).astype(np.float32)
  v = u.copy()
  v[20:] = rng.normal(size=(L - 20, 5))
  y_u, y_v = np.asarray(causal_conv(u, K)), np.asarray(causal_conv(v, K))
  assert np.max(np.abs(y_u[:20] - y_v[:20])) < 1e-5  # outputs before t = 20 ignore u[20:]
  assert np.max(np.abs(y_u[20:] - y_v[20:])) > 1e-2


def test_causal_conv_bfloat16_keeps_dtype(rng):
  u = jnp.asarray(rng.normal(size=(L, 5)), jnp.bfloat16)
  y = causal_conv(u, jnp.asarray(rng.normal(size=(L,)), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# Recurrent view.


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("cplx", [False, True])
def test_recurrence_matches_loop_and_convolution(dense, cplx, rng):
  n = 3
  Ab, Bb, C = random_ssm(rng, n, dense, cplx)
  u = rng.normal(size=L)
  x0 = rng.normal(size=n)
  # float64 loop, from x0
  Abd = np.diag(Ab) if Ab.ndim == 1 else Ab
  x, ys = x0.astype(np.complex128), []
  for t in range(L):
    x = Abd @ x + Bb * u[t]
    ys.append((C @ x).real)
  y, last = recurrence(*as32(Ab, Bb, C, u), jnp.asarray(x0, jnp.float32))
  assert y.shape == (L,) and y.dtype == jnp.float32 and last.shape == (n,)
  assert rel(y, np.array(ys)) < 1e-5 and rel(last, x) < 1e-5
  # conv view == recurrent view (zero initial state)
  y0, _ = recurrence(*as32(Ab, Bb, C, u))
  yc = causal_conv(jnp.asarray(u, jnp.float32)[:, None], kernel(*as32(Ab, Bb, C), L))[:, 0]
  assert rel(yc, np.asarray(y0)) < 1e-5


def test_step_matches_recurrence(rng):
  n = 5
  Ab, Bb, C = as32(*random_ssm(rng, n, dense=False, cplx=True))
  u = jnp.asarray(rng.normal(size=7), jnp.float32)
  y, last = recurrence(Ab, Bb, C, u)
  x = jnp.zeros(n, jnp.complex64)
  for t in range(7):
    y_t, x = lti.step(Ab, Bb, C, x, u[t])
    np.testing.assert_allclose(y_t, y[t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x, last, rtol=1e-5, atol=1e-6)


def test_hippo_legs_conv_equals_recurrence(rng):
  """The S4 pipeline end to end: LegS -> bilinear -> kernel -> conv == recurrence."""
  A, B = hippo.legs(5)
  Ab, Bb = bilinear(A, B, 1.0 / L)
  C = jnp.asarray(rng.normal(size=5), jnp.float32)
  u = jnp.asarray(rng.normal(size=(L, 1)), jnp.float32)
  y_conv = causal_conv(u, kernel(Ab, Bb, C, L))[:, 0]
  y_rec, _ = recurrence(Ab, Bb, C, u[:, 0])
  assert rel(y_conv, np.asarray(y_rec)) < 1e-5


# ------------------------------------------------------------------------------------------------
# One test per error message.

ONES3 = jnp.ones(3)


def test_kernel_errors():
  with pytest.raises(ValueError, match=r"Ab must have rank 1 or 2 .*; got shape \(1, 3, 3\)"):
    lti.kernel(jnp.ones((1, 3, 3)), ONES3, ONES3, 4)
  with pytest.raises(ValueError, match=r"Ab must have shape \(3, 3\) \(N, N\), square; got \(3, 2\)"):
    lti.kernel(jnp.ones((3, 2)), ONES3, ONES3, 4)
  with pytest.raises(ValueError, match="Ab must have a floating or complex dtype; got int32"):
    lti.kernel(jnp.ones(3, jnp.int32), ONES3, ONES3, 4)
  with pytest.raises(ValueError, match=r"Bb must have shape \(3,\) \(N,\) with N = 3 from Ab; got \(2,\)"):
    lti.kernel(ONES3, jnp.ones(2), ONES3, 4)
  with pytest.raises(ValueError, match="Bb must have a floating or complex dtype; got int32"):
    lti.kernel(ONES3, jnp.ones(3, jnp.int32), ONES3, 4)
  with pytest.raises(ValueError, match=r"C must have shape \(3,\) \(N,\) with N = 3 from Ab; got \(1, 3\)"):
    lti.kernel(ONES3, ONES3, jnp.ones((1, 3)), 4)
  with pytest.raises(ValueError, match="C must have a floating or complex dtype; got int32"):
    lti.kernel(ONES3, ONES3, jnp.ones(3, jnp.int32), 4)
  with pytest.raises(ValueError, match="L must be a positive integer; got 0"):
    lti.kernel(ONES3, ONES3, ONES3, 0)


def test_kernel_dplr_errors():
  c3 = jnp.ones(3, jnp.complex64)
  with pytest.raises(ValueError, match=r"Lam must have rank 1 \(N,\); got shape \(3, 3\)"):
    lti.kernel_dplr(jnp.ones((3, 3)), c3, c3, c3, 0.1, 4)
  with pytest.raises(ValueError, match="Lam must have a floating or complex dtype; got int32"):
    lti.kernel_dplr(jnp.ones(3, jnp.int32), c3, c3, c3, 0.1, 4)
  with pytest.raises(ValueError, match=r"P must have rank 1 or 2 .*; got shape \(\)"):
    lti.kernel_dplr(c3, jnp.ones(()), c3, c3, 0.1, 4)
  with pytest.raises(ValueError, match="P must have a floating or complex dtype; got int32"):
    lti.kernel_dplr(c3, jnp.ones(3, jnp.int32), c3, c3, 0.1, 4)
  with pytest.raises(ValueError, match=r"P must have last dimension 3 to match Lam; got shape \(2, 4\)"):
    lti.kernel_dplr(c3, jnp.ones((2, 4)), c3, c3, 0.1, 4)
  with pytest.raises(ValueError, match=r"B must have shape \(3,\) \(N,\) with N = 3 from Lam; got \(4,\)"):
    lti.kernel_dplr(c3, c3, jnp.ones(4), c3, 0.1, 4)
  with pytest.raises(ValueError, match="B must have a floating or complex dtype; got int32"):
    lti.kernel_dplr(c3, c3, jnp.ones(3, jnp.int32), c3, 0.1, 4)
  with pytest.raises(ValueError, match=r"C must have shape \(3,\) \(N,\) with N = 3 from Lam; got \(2,\)"):
    lti.kernel_dplr(c3, c3, c3, jnp.ones(2), 0.1, 4)
  with pytest.raises(ValueError, match="C must have a floating or complex dtype; got int32"):
    lti.kernel_dplr(c3, c3, c3, jnp.ones(3, jnp.int32), 0.1, 4)
  with pytest.raises(ValueError, match=r"dt must have rank 0 \(a scalar\); got shape \(3,\)"):
    lti.kernel_dplr(c3, c3, c3, c3, jnp.ones(3), 4)
  with pytest.raises(ValueError, match="dt must have a floating-point dtype; got int32"):
    lti.kernel_dplr(c3, c3, c3, c3, jnp.ones((), jnp.int32), 4)
  with pytest.raises(ValueError, match="L must be a positive integer; got 2.0"):
    lti.kernel_dplr(c3, c3, c3, c3, 0.1, 2.0)


def test_causal_conv_errors():
  u = jnp.ones((2, 7, 5))
  with pytest.raises(ValueError, match=r"u must have rank 2 or 3 .*; got shape \(7,\)"):
    lti.causal_conv(jnp.ones(7), jnp.ones(7))
  with pytest.raises(ValueError, match="u must have a floating-point dtype; got complex64"):
    lti.causal_conv(jnp.ones((7, 5), jnp.complex64), jnp.ones(7))
  with pytest.raises(ValueError, match=r"u must have length >= 1 along axis -2; got shape \(2, 0, 5\)"):
    lti.causal_conv(jnp.ones((2, 0, 5)), jnp.ones(7))
  with pytest.raises(ValueError, match=r"K must have rank 1 or 2 .*; got shape \(1, 7, 5\)"):
    lti.causal_conv(u, jnp.ones((1, 7, 5)))
  with pytest.raises(ValueError, match="K must have a floating-point dtype; got int32"):
    lti.causal_conv(u, jnp.ones(7, jnp.int32))
  with pytest.raises(ValueError, match=r"K must have shape \(length, 5\) to match u's 5 channels; got \(7, 4\)"):
    lti.causal_conv(u, jnp.ones((7, 4)))
  with pytest.raises(ValueError, match=r"K must have at least one tap; got shape \(0,\)"):
    lti.causal_conv(u, jnp.ones((0,)))


def test_recurrence_errors():
  with pytest.raises(ValueError, match=r"Ab must have rank 1 or 2"):
    lti.recurrence(jnp.ones((1, 3, 3)), ONES3, ONES3, jnp.ones(7))
  with pytest.raises(ValueError, match=r"u must have rank 1 \(length,\); got shape \(7, 1\)"):
    lti.recurrence(ONES3, ONES3, ONES3, jnp.ones((7, 1)))
  with pytest.raises(ValueError, match="u must have a floating-point dtype; got int32"):
    lti.recurrence(ONES3, ONES3, ONES3, jnp.ones(7, jnp.int32))
  with pytest.raises(ValueError, match=r"u must have length >= 1; got shape \(0,\)"):
    lti.recurrence(ONES3, ONES3, ONES3, jnp.ones(0))
  with pytest.raises(ValueError, match=r"x0 must have shape \(3,\) \(N,\) with N = 3 from Ab; got \(4,\)"):
    lti.recurrence(ONES3, ONES3, ONES3, jnp.ones(7), jnp.ones(4))
  with pytest.raises(ValueError, match="x0 must have a floating or complex dtype; got int32"):
    lti.recurrence(ONES3, ONES3, ONES3, jnp.ones(7), jnp.ones(3, jnp.int32))


def test_step_errors():
  with pytest.raises(ValueError, match=r"Bb must have shape \(3,\)"):
    lti.step(ONES3, jnp.ones(4), ONES3, ONES3, 1.0)
  with pytest.raises(ValueError, match=r"x must have shape \(3,\) \(N,\) with N = 3 from Ab; got \(2,\)"):
    lti.step(ONES3, ONES3, ONES3, jnp.ones(2), 1.0)
  with pytest.raises(ValueError, match="x must have a floating or complex dtype; got int32"):
    lti.step(ONES3, ONES3, ONES3, jnp.ones(3, jnp.int32), 1.0)
  with pytest.raises(ValueError, match=r"u_t must have rank 0 \(a scalar\); got shape \(1,\)"):
    lti.step(ONES3, ONES3, ONES3, ONES3, jnp.ones(1))
  with pytest.raises(ValueError, match="u_t must have a floating-point dtype; got int32"):
    lti.step(ONES3, ONES3, ONES3, ONES3, jnp.ones((), jnp.int32))
