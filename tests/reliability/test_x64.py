"""Issue 18, defect 6: with ``jax_enable_x64`` on, every backend (both kernel families included)
runs forward and backward.

The Pallas kernels index in int32; traced under x64 their Python ints and aranges became int64 and
``dynamic_slice`` refused the mix. Results are compared with the float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
import seeds
import ssmax
from ssmax.pallas import selective_scan_mosaic as mosaic_scan
from ssmax.pallas import selective_scan_triton as triton_scan

SMALL = triton_scan.Config(chunk=2, splits=1)
BACKENDS = ["sequential", "associative", "pallas", "pallas_mosaic"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_forward_and_backward_under_x64(backend):
  kw = oracle.random_inputs(seeds.draw(), b=1, l=5 if backend != "pallas_mosaic" else 37, d=2,
                            n=2)
  want_y, want_h = oracle.numpy_scan(**kw)
  with jax.enable_x64(True):
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}

    def loss(u, delta, B):
      a = {**args, "u": u, "delta": delta, "B": B}
      if backend == "pallas":  # the kernel itself, with a short chunk: interpret mode is slow
        a.update(B=a["B"][:, :, None], C=a["C"][:, :, None])  # the kernel takes groups
        y, h = triton_scan.selective_scan(**a, interpret=True, config=SMALL)
      elif backend == "pallas_mosaic":  # two sequence segments: the combine runs under x64 too
        a.update(B=a["B"][:, :, None], C=a["C"][:, :, None])
        y, h = mosaic_scan.selective_scan(
            **a, interpret=True, config=mosaic_scan.Config(segments=2, bwd_segments=2))
      else:
        y, h = ssmax.selective_scan(**a, return_last_state=True, backend=backend)
      return jnp.sum(y * y) + jnp.sum(h), (y, h)

    grads, (y, h) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        args["u"], args["delta"], args["B"])
    want_grads = jax.grad(
        lambda u, delta, B: _oracle_loss(dict(kw, u=u, delta=delta, B=B)), argnums=(0, 1, 2))(
            *(jnp.asarray(kw[k], jnp.float64) for k in ("u", "delta", "B")))
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32
  assert oracle.rel_err(y, want_y) < 1e-5
  assert oracle.rel_err(h, want_h) < 1e-5
  for g, w in zip(grads, want_grads):
    assert g.dtype == jnp.float32
    assert oracle.rel_err(g, w) < 1e-4


def _oracle_loss(kw):
  y, h = oracle.jax64_scan(**kw)
  return jnp.sum(y * y) + jnp.sum(h)


@pytest.mark.parametrize("backend", ["sequential", "pallas"])
def test_state_update_forward_and_backward_under_x64(backend):
  kw = oracle.random_inputs(seeds.draw(), b=1, l=1, d=2, n=2)
  want_y, want_h = oracle.numpy_scan(**kw)
  with jax.enable_x64(True):
    step = lambda u: ssmax.selective_state_update(
        jnp.asarray(kw["initial_state"]), u, jnp.asarray(kw["delta"][:, 0]), jnp.asarray(kw["A"]),
        jnp.asarray(kw["B"][:, 0]), jnp.asarray(kw["C"][:, 0]), jnp.asarray(kw["D"]),
        jnp.asarray(kw["z"][:, 0]), jnp.asarray(kw["delta_bias"]), delta_softplus=True,
        backend=backend)
    y, h = step(jnp.asarray(kw["u"][:, 0]))
    g = jax.grad(lambda u: jnp.sum(step(u)[0]))(jnp.asarray(kw["u"][:, 0]))
  assert oracle.rel_err(y, want_y[:, 0]) < 1e-5
  assert oracle.rel_err(h, want_h) < 1e-5
  assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
