"""The Pallas Triton selective scan (GPUs before Hopper; interpret mode on CPU) against independent
float64 references.

Shapes are small and odd: length 37 with chunks shorter than it, so that several chunks, several
sequence splits and a ragged last chunk are all exercised; channels not a power of two; B and C with
different group counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmax
from ssmax.pallas import selective_scan_triton as triton_scan
import oracle
import seeds

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _grouped(kw, rng, gb, gc):
  b, l, _ = kw["u"].shape
  n = kw["A"].shape[1]
  kw["B"] = rng.normal(size=(b, l, gb, n)).astype(kw["u"].dtype)
  kw["C"] = rng.normal(size=(b, l, gc, n)).astype(kw["u"].dtype)
  return kw


@pytest.mark.parametrize("config", [None, triton_scan.Config(chunk=4, splits=1),
                                    triton_scan.Config(chunk=4, splits=3, layout="tile")],
                         ids=["public", "one_split", "tile"])
def test_forward_and_last_state_fp32(config):
  kw = oracle.random_inputs(11, b=2, l=37, d=5, n=3)
  want_y, want_last = oracle.numpy_scan(**kw)
  if config is None:  # through the public API
    y, last = ssmax.selective_scan(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                                      for k, v in kw.items()},
                                   return_last_state=True, backend="pallas")
  else:
    x = {k: jnp.asarray(kw[k]) for k in NAMES}
    x["B"], x["C"] = x["B"][:, :, None], x["C"][:, :, None]
    y, last = triton_scan.selective_scan(**x, delta_softplus=True, interpret=True, config=config)
  assert y.dtype == jnp.float32 and last.dtype == jnp.float32
  assert last.shape == (2, 5, 3)
  assert oracle.rel_err(y, want_y) < 2e-4
  assert oracle.rel_err(last, want_last) < 2e-4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_half_precision_inputs(dtype):
  kw = oracle.random_inputs(12, b=2, l=37, d=6, n=4, dtype=np.float32)
  kw = _grouped(kw, np.random.default_rng(3), 2, 3)
  x = {k: (jnp.asarray(v, dtype) if k in ("u", "delta", "z", "B", "C") else jnp.asarray(v))
       for k, v in kw.items() if k != "delta_softplus"}
  # The oracle sees exactly the rounded inputs.
  want_y, want_last = oracle.numpy_scan(**{k: np.asarray(v, np.float32) for k, v in x.items()},
                                        delta_softplus=True)
  y, last = ssmax.selective_scan(**x, delta_softplus=True, return_last_state=True,
                                 backend="pallas")
  assert y.dtype == dtype
  assert oracle.rel_err(y, want_y) < 2e-2
  assert oracle.rel_err(last, want_last) < 2e-2


# (b, l, d, n, B groups, C groups, config). Channels per program: 1 for "groups" (d=6 in 6 fine
# groups); 32 lanes, partly masked, for the others. The rows backward reduces 2·next_pow2(n) values
# over the lanes: fewer values than lanes for "wide", more for "wide_state20".
GRADIENT_CASES = {
    "groups": (2, 37, 6, 3, 3, 2, triton_scan.Config(chunk=4, splits=3)),
    "groups_tile": (2, 37, 6, 3, 3, 2, triton_scan.Config(chunk=4, splits=3, layout="tile")),
    "wide": (2, 37, 40, 5, 1, 1, triton_scan.Config(chunk=4, splits=3)),
    "wide_state20": (1, 29, 36, 20, 2, 1, triton_scan.Config(chunk=4, splits=2)),
    "wide_tile": (2, 37, 40, 5, 1, 1, triton_scan.Config(chunk=4, splits=3, layout="tile")),
    # 16-bit B and C with an even state size: read as packed pairs in the rows layout.
    "wide_bf16": (2, 37, 40, 6, 1, 1, triton_scan.Config(chunk=4, splits=3), jnp.bfloat16),
    "wide_fp16": (1, 21, 40, 4, 2, 1, triton_scan.Config(chunk=4, splits=2), jnp.float16),
}
HALF = ("u", "delta", "z", "B", "C")


@functools.lru_cache(maxsize=None)
def _gradients(case):
  """Pallas gradients (twice) and float64 reference gradients of one loss using y and last_state."""
  b, l, d, n, gb, gc, config, *dtype = GRADIENT_CASES[case]
  seed = seeds.draw()
  rng = np.random.default_rng(seed)
  kw = _grouped(oracle.random_inputs(seed, b=b, l=l, d=d, n=n), rng, gb, gc)
  wy = rng.normal(size=(b, l, d)).astype(np.float32)
  wl = rng.normal(size=(b, d, n)).astype(np.float32)
  args = [jnp.asarray(kw[k], dtype[0] if dtype and k in HALF else None) for k in NAMES]

  def loss(*a):
    y, last = triton_scan.selective_scan(*a, delta_softplus=True, interpret=True, config=config)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(last * wl)

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(NAMES)))))
  got, again = grad(*args), grad(*args)
  with jax.enable_x64(True):
    def loss64(*a):
      y, last = oracle.jax64_scan(**dict(zip(NAMES, a)), delta_softplus=True)
      return jnp.sum(y * jnp.asarray(wy, jnp.float64)) + jnp.sum(last * jnp.asarray(wl, jnp.float64))

    want = jax.grad(loss64, argnums=tuple(range(len(NAMES))))(
        *[jnp.asarray(np.asarray(a, np.float32), jnp.float64) for a in args])
    want = [np.asarray(w) for w in want]
  return seed, args, got, again, want


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradient_vs_float64(case, index):
  seed, args, got, _, want = _gradients(case)
  assert got[index].shape == args[index].shape
  assert got[index].dtype == args[index].dtype
  assert np.all(np.isfinite(np.asarray(got[index]))), f"seed={seed}"
  # 16-bit cases: y, its cotangent and the inputs' gradients are rounded to 16 bits.
  tol = 2e-2 if len(GRADIENT_CASES[case]) > 7 else 1e-3
  assert oracle.rel_err(got[index], want[index]) < tol, f"seed={seed}"


@pytest.mark.parametrize("case", ["groups", "wide_state20"])
def test_backward_is_deterministic(case):
  _, _, got, again, _ = _gradients(case)
  for a, b in zip(got, again):
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("m,lanes", [(8, 32), (32, 32), (64, 32), (4, 8), (16, 8), (2, 1)])
def test_reduce_scatter_sums_every_vector(m, lanes, rng):
  x = rng.normal(size=(m, lanes)).astype(np.float32)
  out = triton_scan._reduce_scatter([jnp.asarray(v) for v in x], lanes, interpret=True)
  assert len(out) == max(m // lanes, 1)
  sums = triton_scan._unscatter(jnp.stack(out)[None], m, lanes)[0]
  np.testing.assert_allclose(np.asarray(sums), x.astype(np.float64).sum(axis=1), rtol=1e-5,
                             atol=1e-5)


def test_rejects_unknown_layout():
  kw = oracle.random_inputs(1, b=1, l=3, d=2, n=2)
  x = {k: jnp.asarray(kw[k]) for k in NAMES}
  x["B"], x["C"] = x["B"][:, :, None], x["C"][:, :, None]
  with pytest.raises(ValueError, match="config.layout must be 'auto', 'rows' or 'tile'"):
    triton_scan.selective_scan(**x, interpret=True, config=triton_scan.Config(layout="cols"))


def _unsupported_reason(**shape):
  kw = oracle.random_inputs(**shape)
  x = ssmax.scan.check_inputs(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                                 for k, v in kw.items()})
  return triton_scan.unsupported_reason(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias,
                                        x.initial_state)


def test_unsupported_reason_complex_a():
  reason = _unsupported_reason(seed=14, b=1, l=5, d=2, n=2, complex_a=True)
  assert reason is not None and "complex A" in reason


def test_unsupported_reason_large_state():
  reason = _unsupported_reason(seed=15, b=1, l=3, d=2, n=257, with_state=False)
  assert reason is not None and "257" in reason
  assert _unsupported_reason(seed=15, b=1, l=3, d=2, n=256, with_state=False) is None


def test_explicit_pallas_raises_and_auto_falls_back():
  kw = oracle.random_inputs(16, b=1, l=5, d=2, n=2, complex_a=True)
  kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
  with pytest.raises(ValueError, match='backend="pallas" cannot take these inputs: complex A'):
    ssmax.selective_scan(**kw, backend="pallas")
  y = ssmax.selective_scan(**kw, backend="auto")
  want, _ = oracle.numpy_scan(**kw)
  assert oracle.rel_err(y, want) < 2e-4


def test_rows_backward_needs_one_warp_of_channels():
  kw = oracle.random_inputs(2, b=1, l=5, d=64, n=4)
  x = {k: jnp.asarray(kw[k]) for k in NAMES}
  x["B"], x["C"] = x["B"][:, :, None], x["C"][:, :, None]
  args = [x[k] for k in NAMES]

  def grad(config):
    loss = lambda *a: triton_scan.selective_scan(*a, interpret=True, config=config)[0].sum()
    return jax.grad(loss)(*args)

  with pytest.raises(ValueError, match="config.layout='rows' needs bwd_block_channels <= 32"):
    grad(triton_scan.Config(layout="rows", bwd_block_channels=64))
  # "auto" takes the tile layout for such a backward instead, and agrees with the default.
  np.testing.assert_allclose(grad(triton_scan.Config(bwd_block_channels=64)),
                             grad(triton_scan.Config()), rtol=1e-5, atol=1e-5)


def test_declines_segment_ids():
  """Packed documents run on the Mosaic GPU kernel only; asking the Triton one is a clear error."""
  from ssmax import pallas

  kw = oracle.random_inputs(11, b=1, l=8, d=5, n=3)
  args = [jnp.asarray(kw[k]) for k in ("u", "delta", "A")] + [
      jnp.asarray(kw[k])[:, :, None] for k in ("B", "C")]
  with pytest.raises(ValueError, match="segment_ids are not supported by the Triton kernel"):
    pallas.selective_scan(*args, segment_ids=np.zeros((1, 8), np.int32),
                          config=triton_scan.Config(), interpret=True)
