"""ssmax.selective_scan (sequential and associative backends) against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ssmax
from oracle import jax64_scan, numpy_scan, random_inputs, rel_err

BACKENDS = ["sequential", "associative"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [None, 1, 5])
def test_matches_float64_loop(backend, groups, seed):
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=groups)
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
  y_ref, last_ref = numpy_scan(**kw)
  assert y.dtype == jnp.float32 and last.dtype == jnp.float32
  assert y.shape == (2, 37, 5) and last.shape == (2, 5, 3)
  assert rel_err(y, y_ref) < 2e-4
  assert rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_channels_split_contiguously(backend, seed):
  # 6 channels in 3 groups: channels (0,1) read group 0, (2,3) group 1, (4,5) group 2.
  kw = random_inputs(seed, b=1, l=11, d=6, n=4, groups=3)
  y = ssmax.selective_scan(**kw, backend=backend)
  y_ref, _ = numpy_scan(**kw)
  assert rel_err(y, y_ref) < 2e-4
  # Group 1 changes only channels 2 and 3.
  kw2 = dict(kw, B=kw["B"].copy())
  kw2["B"][:, :, 1] += 1.0
  y2 = ssmax.selective_scan(**kw2, backend=backend)
  changed = np.any(np.abs(np.asarray(y2 - y)) > 1e-6, axis=(0, 1))
  np.testing.assert_array_equal(changed, [False, False, True, True, False, False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_arguments_absent(backend, seed):
  kw = random_inputs(seed, b=3, l=9, d=5, n=2, with_state=False)
  for drop in ("D", "z", "delta_bias"):
    kw[drop] = None
  kw["delta_softplus"] = False
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
  y_ref, last_ref = numpy_scan(**kw)
  assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_one(backend, seed):
  kw = random_inputs(seed, b=2, l=1, d=5, n=3)
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
  y_ref, last_ref = numpy_scan(**kw)
  assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_a_doubles_real_part(backend, seed):
  kw = random_inputs(seed, b=2, l=13, d=5, n=3, complex_a=True)
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
  y_ref, last_ref = numpy_scan(**kw)
  assert y.dtype == jnp.float32 and last.dtype == jnp.complex64
  assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(backend, dtype, seed):
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=5)
  for k in ("u", "delta", "z", "B", "C"):
    kw[k] = jnp.asarray(kw[k], dtype)
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
  # The reference sees the same rounded inputs, in float64.
  ref_kw = {k: (np.asarray(v.astype(jnp.float32)) if isinstance(v, jax.Array) else v) for k, v in kw.items()}
  y_ref, last_ref = numpy_scan(**ref_kw)
  assert y.dtype == dtype and last.dtype == jnp.float32
  assert rel_err(y.astype(jnp.float32), y_ref) < 2e-2
  assert rel_err(last, last_ref) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64(backend, seed):
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=5)
  names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
  rng = np.random.default_rng(seed + 1)
  wy = rng.normal(size=(2, 37, 5))
  ws = rng.normal(size=(2, 5, 3))

  def loss(fn, dtype, *args):
    y, last = fn(**dict(zip(names, args)), delta_softplus=True)
    return jnp.sum(y * wy.astype(dtype)) + jnp.sum(last * ws.astype(dtype))

  scan = lambda **a: ssmax.selective_scan(**a, return_last_state=True, backend=backend)
  args = [jnp.asarray(kw[k]) for k in names]
  grads = jax.jit(jax.grad(lambda *a: loss(scan, np.float32, *a), argnums=tuple(range(9))))(*args)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(kw[k], jnp.float64) for k in names]
    grads64 = jax.grad(lambda *a: loss(jax64_scan, np.float64, *a), argnums=tuple(range(9)))(*args64)
    grads64 = [np.asarray(g) for g in grads64]
  for name, g, g64 in zip(names, grads, grads64):
    assert g.shape == g64.shape, name
    assert rel_err(g, g64) < 1e-3, name


def test_float64_oracle_gradient_matches_finite_differences(seed):
  # The gradient oracle itself, checked against central differences of the NumPy loop.
  kw = random_inputs(seed, b=1, l=7, d=3, n=2)
  rng = np.random.default_rng(seed + 2)
  wy = rng.normal(size=(1, 7, 3))
  with jax.enable_x64(True):
    g = jax.grad(lambda dlt: jnp.sum(jax64_scan(**dict(kw, delta=dlt))[0] * wy))(
        jnp.asarray(kw["delta"], jnp.float64))
  direction = rng.normal(size=kw["delta"].shape)
  eps = 1e-6
  f = lambda dlt: np.sum(numpy_scan(**dict(kw, delta=dlt))[0] * wy)
  base = kw["delta"].astype(np.float64)
  fd = (f(base + eps * direction) - f(base - eps * direction)) / (2 * eps)
  assert abs(fd - np.sum(np.asarray(g) * direction)) < 1e-6 * max(1.0, abs(fd))


def test_backends_agree_under_jit_and_vmap(seed):
  kw = random_inputs(seed, b=4, l=10, d=5, n=3)
  arrays = {k: v for k, v in kw.items() if k != "delta_softplus"}

  def one(backend):
    f = lambda a: ssmax.selective_scan(**{k: v[None] if k not in ("A", "D", "delta_bias") else v
                                          for k, v in a.items()}, delta_softplus=True, backend=backend)[0]
    axes = {k: (None if k in ("A", "D", "delta_bias") else 0) for k in arrays}
    return jax.jit(jax.vmap(f, in_axes=(axes,)))(arrays)

  y_ref, _ = numpy_scan(**kw)
  for backend in BACKENDS:
    assert rel_err(one(backend), y_ref) < 2e-4


def test_auto_on_cpu_uses_a_pure_jax_backend(seed):
  kw = random_inputs(seed, b=1, l=8, d=5, n=3)
  y = ssmax.selective_scan(**kw, backend="auto")
  y_ref, _ = numpy_scan(**kw)
  assert rel_err(y, y_ref) < 2e-4


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 24), n=st.integers(1, 4), cpg=st.integers(1, 3),
       g=st.integers(1, 3), split=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_property_chunking_equals_whole_and_oracle(b, l, n, cpg, g, split, seed):
  # Scanning [0, k) then [k, l) from the carried state equals scanning [0, l) in one go.
  d = cpg * g
  kw = random_inputs(seed, b=b, l=l, d=d, n=n, groups=g)
  y_ref, last_ref = numpy_scan(**kw)
  k = int(round(split * l))
  for backend in BACKENDS:
    y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend)
    assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4
    if 0 < k < l:
      cut = lambda a, s: a[:, s]
      first = {**kw, **{key: cut(kw[key], slice(0, k)) for key in ("u", "delta", "z", "B", "C")}}
      second = {**kw, **{key: cut(kw[key], slice(k, l)) for key in ("u", "delta", "z", "B", "C")}}
      y1, s1 = ssmax.selective_scan(**first, return_last_state=True, backend=backend)
      y2, s2 = ssmax.selective_scan(**dict(second, initial_state=s1), return_last_state=True,
                                    backend=backend)
      assert rel_err(jnp.concatenate([y1, y2], axis=1), y_ref) < 2e-4
      assert rel_err(s2, last_ref) < 2e-4


# One test per error message.

def _good():
  return random_inputs(0, b=2, l=5, d=4, n=3)


@pytest.mark.parametrize("change, match", [
    (dict(u=np.zeros((2, 5))), r"u must have rank 3"),
    (dict(u=np.zeros((2, 5, 4), np.int32)), r"u must have a floating-point dtype"),
    (dict(u=np.zeros((2, 0, 4), np.float32), delta=np.zeros((2, 0, 4), np.float32)), r"length >= 1"),
    (dict(delta=np.zeros((2, 6, 4), np.float32)), r"delta must have shape \(2, 5, 4\)"),
    (dict(delta=np.zeros((2, 5, 4), np.int32)), r"delta must have a floating-point dtype"),
    (dict(A=np.zeros((4,), np.float32)), r"A must have rank 2"),
    (dict(A=np.zeros((3, 3), np.float32)), r"A must have shape \(4, state\)"),
    (dict(A=np.zeros((4, 3), np.int32)), r"A must have a floating or complex dtype"),
    (dict(B=np.zeros((2, 5), np.float32)), r"B must have rank 3 or 4"),
    (dict(B=np.zeros((2, 5, 2), np.float32)), r"B must have shape \(2, 5, 3\)"),
    (dict(C=np.zeros((2, 5, 3, 3), np.float32)), r"C has 3 groups, which must divide the 4 channels"),
    (dict(C=np.zeros((2, 4, 2, 3), np.float32)), r"C must have shape \(2, 5, \?, 3\)"),
    (dict(B=np.zeros((2, 5, 3), np.int8)), r"B must have a floating or complex dtype"),
    (dict(D=np.zeros((5,), np.float32)), r"D must have shape \(4,\)"),
    (dict(D=np.zeros((4,), np.int32)), r"D must have a floating-point dtype"),
    (dict(z=np.zeros((2, 5, 3), np.float32)), r"z must have shape \(2, 5, 4\)"),
    (dict(z=np.zeros((2, 5, 4), np.int32)), r"z must have a floating-point dtype"),
    (dict(delta_bias=np.zeros((4, 1), np.float32)), r"delta_bias must have shape \(4,\)"),
    (dict(delta_bias=np.zeros((4,), bool)), r"delta_bias must have a floating-point dtype"),
    (dict(initial_state=np.zeros((2, 3, 4), np.float32)), r"initial_state must have shape \(2, 4, 3\)"),
    (dict(initial_state=np.zeros((2, 4, 3), np.int32)), r"initial_state must have a floating or complex"),
    (dict(delta_softplus=1), r"delta_softplus must be a Python bool"),
    (dict(backend="cuda"), r"backend must be one of"),
])
def test_errors_name_the_argument(change, match):
  kw = {**_good(), **change}
  with pytest.raises(ValueError, match=match):
    ssmax.selective_scan(**kw)


def test_errors_raise_at_trace_time_under_jit():
  kw = _good()
  bad = dict(kw, delta=np.zeros((2, 6, 4), np.float32))
  arrays = {k: v for k, v in bad.items() if k != "delta_softplus"}
  with pytest.raises(ValueError, match="delta must have shape"):
    jax.jit(lambda a: ssmax.selective_scan(**a, delta_softplus=True))(arrays)
