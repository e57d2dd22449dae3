"""The fused selective scan on the GPU against ``lax.associative_scan``.

``backend="pallas"`` and ``backend="associative"`` through ``ssmax.selective_scan``: y, the last
state and all nine gradients (a cotangent on the last state too), in float32 and bfloat16, at small
odd shapes (state sizes 1 to 256, groups, initial states) and at the three benchmark shapes of
``benchmarks.bench_scan``, three of them with packed documents (``segment_ids``); and two backward
runs must give bit-identical gradients (no atomics).

Deselected by default; on a machine with a GPU::

  pytest -m gpu tests/kernels/test_scan_gpu.py
"""

import jax
import jax.numpy as jnp
import pytest

import ssmax
from benchmarks.harness import rel_err
from benchmarks.scan_inputs import SHAPES, make_inputs, packed_segment_ids, split

pytestmark = pytest.mark.gpu

SMALL = [  # (batch, length, channels, state, groups, initial state)
    (2, 37, 5, 3, None, True), (1, 300, 6, 16, 3, True), (3, 129, 40, 7, 2, False),
    (2, 1000, 64, 16, None, True), (2, 65, 96, 1, 4, True), (1, 17, 33, 256, None, True)]
CASES = ([pytest.param((b, l, d, n), g, st, i, id=f"{b}x{l}x{d}x{n}-g{g}-h0{int(st)}")
          for i, (b, l, d, n, g, st) in enumerate(SMALL)] +
         [pytest.param(SHAPES[s], None, False, 99, id=s) for s in SHAPES if s != "tiny"])
TOL = {"float32": 2e-4, "bfloat16": 2e-2}
TOL_LONG_FLOAT32 = 1e-3  # long fp32 sums differ by more than 2e-4 between two fp32 algorithms


@pytest.fixture(scope="module", autouse=True)
def gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")


def forward_backward(kw, backend):
  """A jitted ``(*arrays) -> (y, last_state, gradients)`` for ``backend`` and its arguments."""
  names, args, static = split(kw)
  b, _, d = kw["u"].shape
  wy = jax.random.normal(jax.random.PRNGKey(7), kw["u"].shape, jnp.float32).astype(kw["u"].dtype)
  wl = jax.random.normal(jax.random.PRNGKey(8), (b, d, kw["A"].shape[1]), jnp.float32)

  def run(*a):
    return ssmax.selective_scan(**dict(zip(names, a)), **static, return_last_state=True,
                                backend=backend)

  def fwd_bwd(*a):  # one compile: outputs and every gradient (the last state's too)
    (y, last), vjp = jax.vjp(run, *a)
    return y, last, vjp((wy, wl))

  return jax.jit(fwd_bwd), names, args


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,groups,with_state,seed", CASES + [
    pytest.param((2, 1000, 64, 16), None, True, 7, id="2x1000x64x16-packed"),
    pytest.param(SHAPES["130m-train"], None, False, 98, id="130m-train-packed"),
    pytest.param(SHAPES["long-32k"], None, False, 97, id="long-32k-packed")])
def test_pallas_matches_associative(shape, groups, with_state, seed, dtype):
  """Seeds 97-98 and the "-packed" cases add segment_ids (documents of long-tailed lengths)."""
  kw = make_inputs(jax.random.fold_in(jax.random.PRNGKey(0), seed), *shape, jnp.dtype(dtype),
                   groups=groups, with_state=with_state)
  if seed in (7, 97, 98):
    kw["segment_ids"] = packed_segment_ids(jax.random.PRNGKey(seed), *shape[:2], 100.0)
  pallas, names, args = forward_backward(kw, "pallas")
  associative, _, _ = forward_backward(kw, "associative")
  yp, lp, gp = pallas(*args)
  ya, la, ga = associative(*args)
  errors = {"y": rel_err(yp, ya), "last_state": rel_err(lp, la)}
  errors |= {f"d{k}": rel_err(a, b) for k, a, b in zip(names, gp, ga)}
  tol = TOL_LONG_FLOAT32 if seed >= 97 and dtype == "float32" else TOL[dtype]
  print(f"worst rel. error {max(errors.values()):.2e} (tol {tol:.0e}): {errors}")
  assert len(errors) == 2 + len(names)
  assert all(e < tol for e in errors.values()), errors  # NaN fails too

  again = pallas(*args)[2]
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(gp, again)), "backward not deterministic"
