"""Issue 18: inputs the fused kernels used to get wrong (interpret mode on the CPU).

Defect 9: ``A = -inf`` at a length that is not a multiple of the chunk gave a NaN last state
(0·(-inf) in the padding steps). Zero-size batch, channel or state dimensions raised
ZeroDivisionError; NumPy float64 inputs were refused with x64 off, which the other backends cast.

The kernel-level checks call the Triton kernel (where these fixes are); the public calls with
``backend="pallas"`` check whatever kernel runs it on this machine, so a new kernel (Mosaic GPU)
must give the same answers: its ``unsupported_reason`` can reuse ``selective_scan_triton.
empty_reason`` and ``canonical``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
import seeds
import ssmax
from ssmax.pallas import selective_scan_triton as triton_scan

SMALL = triton_scan.Config(chunk=4, splits=2)


def _inputs(b=1, l=11, d=3, n=2, dtype=np.float32):
  rng = np.random.default_rng(seeds.draw())
  return dict(u=rng.normal(size=(b, l, d)).astype(dtype),
              delta=rng.uniform(0.1, 0.5, (b, l, d)).astype(dtype),
              A=-rng.uniform(0.5, 1.0, (d, n)).astype(dtype),
              B=rng.normal(size=(b, l, n)).astype(dtype),
              C=rng.normal(size=(b, l, n)).astype(dtype))


def test_minus_inf_A_at_a_ragged_length_gives_a_finite_last_state():
  x = _inputs(l=11)  # 11 = 2 chunks of 4 + 3: the last chunk has a padding step
  x["A"][0, 0] = -np.inf
  x["A"][1, :] = -np.inf
  want_y, want_h = oracle.numpy_scan(**x)
  k = dict(x, B=x["B"][:, :, None], C=x["C"][:, :, None])
  y, h = triton_scan.selective_scan(**k, interpret=True, config=SMALL)
  assert np.all(np.isfinite(h)) and np.all(np.isfinite(y))
  assert oracle.rel_err(h, want_h) < 1e-5
  assert oracle.rel_err(y, want_y) < 1e-5


@pytest.mark.parametrize("shape,axis", [((0, 4, 3, 2), "batch"), ((2, 4, 0, 2), "channels"),
                                        ((2, 4, 3, 0), "state")])
def test_zero_size_dimension_is_a_value_error(shape, axis):
  b, l, d, n = shape
  x = _inputs(b, l, d, n)
  with pytest.raises(ValueError, match=f"zero-size {axis}"):
    ssmax.selective_scan(**x, backend="pallas")
  with pytest.raises(ValueError, match=f"zero-size {axis}"):
    triton_scan.selective_scan(**dict(x, B=x["B"][:, :, None], C=x["C"][:, :, None]),
                                interpret=True)
  # The other backends take it.
  assert ssmax.selective_scan(**x, backend="associative").shape == (b, l, d)
  state = np.zeros((b, d, n), np.float32)
  step = dict(u=x["u"][:, 0], delta=x["delta"][:, 0], A=x["A"], B=x["B"][:, 0], C=x["C"][:, 0])
  with pytest.raises(ValueError, match=f"zero-size {axis}"):
    ssmax.selective_state_update(state, **step, backend="pallas")


def test_numpy_float64_inputs_are_cast_as_by_the_other_backends():
  assert not jax.config.jax_enable_x64
  x = _inputs(l=5, dtype=np.float64)
  want = ssmax.selective_scan(**x, backend="sequential")
  got = ssmax.selective_scan(**x, backend="pallas")
  assert got.dtype == want.dtype == jnp.float32
  assert oracle.rel_err(got, want) < 1e-5
  state = np.zeros((1, 3, 2))
  step = dict(u=x["u"][:, 0], delta=x["delta"][:, 0], A=x["A"], B=x["B"][:, 0], C=x["C"][:, 0])
  y_want, h_want = ssmax.selective_state_update(state, **step, backend="sequential")
  y, h = ssmax.selective_state_update(state, **step, backend="pallas")
  assert oracle.rel_err(y, y_want) < 1e-6 and oracle.rel_err(h, h_want) < 1e-6
