"""`selective_state_update` (one decoding step), plain JAX and the Pallas step kernel (interpret mode
on CPU), against the float64 NumPy scan loop over a sequence of length one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmax
from ssmax import pallas as ssmax_pallas
import oracle
import seeds


def step_inputs(seed, b=3, d=37, n=5, rank=None, groups=None, dtype=np.float32, complex_a=False):
  """One step's inputs (length axis dropped) and, with ``rank``, a low-rank Δ and its projection."""
  kw = oracle.random_inputs(seed, b=b, l=1, d=d, n=n, groups=groups, dtype=dtype,
                            complex_a=complex_a)
  one = {k: (v[:, 0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
  if rank is not None:
    rng = np.random.default_rng(seed + 1)
    one["delta"] = rng.normal(size=(b, rank)).astype(dtype)
    one["delta_proj"] = (rng.normal(size=(rank, d)) * 0.4).astype(dtype)
  return one


def oracle_step(one):
  """float64: the length-one scan from ``initial_state``, Δ projected first."""
  delta = np.asarray(one["delta"], np.float64)
  if one.get("delta_proj") is not None:
    delta = delta @ np.asarray(one["delta_proj"], np.float64)
  lift = lambda k: np.asarray(one[k])[:, None]
  y, last = oracle.numpy_scan(lift("u"), delta[:, None], one["A"], lift("B"), lift("C"), one["D"],
                              lift("z"), one["delta_bias"], True, one["initial_state"])
  return y[:, 0], last


def call(one, backend, **overrides):
  kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in one.items()}
  kw.update(overrides)
  state = kw.pop("initial_state")
  return ssmax.selective_state_update(state, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["sequential", "pallas"])
@pytest.mark.parametrize("case", [dict(), dict(rank=3), dict(d=20, groups=4, rank=6),
                                  dict(d=40, n=16, rank=1), dict(b=1, d=5, n=1)],
                         ids=["full_delta", "low_rank", "groups", "n16_masked", "tiny"])
def test_step_matches_float64_oracle(backend, case):
  one = step_inputs(seeds.draw(), **case)
  want_y, want_h = oracle_step(one)
  y, h = call(one, backend)
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32 and h.shape == want_h.shape
  assert oracle.rel_err(y, want_y) < 2e-5
  assert oracle.rel_err(h, want_h) < 2e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_step_half_precision(dtype):
  one = step_inputs(seeds.draw(), d=33, n=16, rank=4, dtype=dtype)
  want_y, want_h = oracle_step(one)
  y, h = call(one, "pallas")
  assert y.dtype == dtype and h.dtype == jnp.float32
  assert oracle.rel_err(y, want_y) < 1e-2  # y is rounded to 16 bits; h stays float32
  assert oracle.rel_err(h, want_h) < 1e-5
  y_plain, h_plain = call(one, "sequential")
  assert oracle.rel_err(h, h_plain) < 1e-5


def test_optional_inputs_absent():
  one = step_inputs(seeds.draw(), d=7, n=3)
  for k in ("D", "z", "delta_bias"):
    one[k] = None
  y, h = call(one, "pallas", delta_softplus=False)
  y_plain, h_plain = call(one, "sequential", delta_softplus=False)
  assert oracle.rel_err(y, y_plain) < 1e-5 and oracle.rel_err(h, h_plain) < 1e-5


def test_steps_chain_to_the_scan():
  """Seven steps, state carried, equal one selective_scan over length seven."""
  seed = seeds.draw()
  kw = oracle.random_inputs(seed, b=2, l=7, d=9, n=4, groups=3)
  j = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
  want_y, want_h = ssmax.selective_scan(**j, return_last_state=True, backend="sequential")
  h = j["initial_state"]
  ys = []
  for t in range(7):
    y, h = ssmax.selective_state_update(h, j["u"][:, t], j["delta"][:, t], j["A"], j["B"][:, t],
                                        j["C"][:, t], j["D"], j["z"][:, t], j["delta_bias"], True,
                                        backend="pallas")
    ys.append(y)
  assert oracle.rel_err(jnp.stack(ys, 1), want_y) < 2e-5
  assert oracle.rel_err(h, want_h) < 2e-5


def test_complex_a_plain_step_and_auto_fallback():
  one = step_inputs(seeds.draw(), d=6, n=3, complex_a=True)
  want_y, want_h = oracle_step(one)
  for backend in ("sequential", "auto"):  # auto falls back to plain JAX for complex A
    y, h = call(one, backend)
    assert h.dtype == jnp.complex64
    assert oracle.rel_err(y, want_y) < 2e-5 and oracle.rel_err(h, want_h) < 2e-5
  with pytest.raises(ValueError, match="complex"):
    call(one, "pallas")


def test_kernel_step_gradients_equal_plain_gradients():
  one = step_inputs(seeds.draw(), d=11, n=4, rank=3)

  def loss(backend, state, u, delta, proj):
    y, h = ssmax.selective_state_update(state, u, delta, one["A"], one["B"], one["C"], one["D"],
                                        one["z"], one["delta_bias"], True, delta_proj=proj,
                                        backend=backend)
    return jnp.sum(y * y) + jnp.sum(jnp.sin(h))

  args = [jnp.asarray(one[k]) for k in ("initial_state", "u", "delta", "delta_proj")]
  want = jax.grad(lambda *a: loss("sequential", *a), argnums=(0, 1, 2, 3))(*args)
  got = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2, 3)))(*args)
  for g, w in zip(got, want):
    assert oracle.rel_err(g, w) < 1e-5
  # and the plain gradient of Δ's projection against a central difference (the step computes in
  # float32, so a wide step)
  f = lambda p: loss("sequential", args[0], args[1], args[2], p)
  g = want[3][1, 2]
  e = jnp.zeros_like(args[3]).at[1, 2].set(1e-2)
  assert abs((f(args[3] + e) - f(args[3] - e)) / 2e-2 - g) < 2e-3 * (1 + abs(g))


@pytest.mark.parametrize("config", [ssmax_pallas.StepConfig(block_channels=8, num_warps=1),
                                    ssmax_pallas.StepConfig(block_channels=128)])
def test_kernel_step_configs(config):
  one = step_inputs(seeds.draw(), d=37, n=5, rank=3)
  want_y, want_h = oracle_step(one)
  kw = {k: jnp.asarray(v) for k, v in one.items() if isinstance(v, np.ndarray)}
  g = lambda m: m[:, None]
  y, h = ssmax_pallas.selective_state_update(
      kw["initial_state"], kw["u"], kw["delta"], kw["A"], g(kw["B"]), g(kw["C"]), kw["D"], kw["z"],
      kw["delta_bias"], kw["delta_proj"], delta_softplus=True, interpret=True, config=config)
  assert oracle.rel_err(y, want_y) < 2e-5 and oracle.rel_err(h, want_h) < 2e-5


def test_step_errors_name_the_argument():
  one = step_inputs(0, d=8, n=3, rank=2)
  with pytest.raises(ValueError, match="delta_proj must have shape"):
    call(one, "auto", delta_proj=jnp.ones((2, 7)))
  with pytest.raises(ValueError, match=r"delta must have shape \(3, 2\)"):
    call(one, "auto", delta=jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="u must have rank 2"):
    call(one, "auto", u=jnp.ones((3, 1, 8)))
  # The step's own argument names, not those of the scan it is checked as.
  with pytest.raises(ValueError, match=r"^state must have shape \(3, 8, 3\)"):
    call(one, "auto", initial_state=jnp.ones((3, 8, 4)))
  with pytest.raises(ValueError, match=r"z must have shape .* \(batch, channels\), like u"):
    call(one, "auto", z=jnp.ones((3, 7)))
  with pytest.raises(ValueError, match="B must have rank 2 or 3"):
    call(one, "auto", B=jnp.ones((3,)))
  with pytest.raises(ValueError, match="backend must be one of"):
    call(one, "cuda")
  with pytest.raises(ValueError, match="block_channels must be a power of two"):
    kw = {k: jnp.asarray(v) for k, v in one.items() if isinstance(v, np.ndarray)}
    ssmax_pallas.selective_state_update(
        kw["initial_state"], kw["u"], kw["delta"], kw["A"], kw["B"][:, None], kw["C"][:, None],
        delta_proj=kw["delta_proj"], interpret=True,
        config=ssmax_pallas.StepConfig(block_channels=3))
