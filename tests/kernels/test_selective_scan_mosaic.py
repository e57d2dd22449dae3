"""The Mosaic GPU selective scan (:mod:`ssmax.pallas.selective_scan_mosaic`) in Mosaic GPU's
interpreter on the CPU, against the float64 oracle: y, the last state and all nine gradients.

The interpreter simulates TMA copies, barriers and shared memory, so what is tested is the kernel's
blocking: tiles, the copy ring, sequence segments in both directions, channel padding per group,
the backward's sub-tiles and its dB/dC partial sums (only the warp-shuffle butterfly is replaced by
a plain sum there). Each case takes tens of seconds on a CPU. The same kernel on a GPU:
``pytest -m gpu tests/kernels/test_scan_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
import seeds
from ssmax.pallas import selective_scan_mosaic as mosaic

NAMES = "u delta A B C D z delta_bias initial_state".split()


def make_inputs(b, l, d, n, g):
  r = np.random.default_rng(seeds.draw())
  f = lambda *s: r.normal(size=s).astype(np.float32)
  return dict(u=f(b, l, d), delta=f(b, l, d) * 0.5 - 1.0, A=-np.exp(f(d, n) * 0.5),
              B=f(b, l, g, n), C=f(b, l, g, n), D=f(d), z=f(b, l, d), delta_bias=f(d) * 0.3,
              initial_state=f(b, d, n))


def check(shape, *, use=("D", "z", "delta_bias", "initial_state"), softplus=True, config=None,
          tol=2e-5, segment_ids=None):
  x = make_inputs(*shape)
  if not softplus:  # Δ used as given: keep it positive, or the state grows past float32
    x["delta"] = np.exp(x["delta"] - 1.0)
  names = [k for k in NAMES if k in ("u", "delta", "A", "B", "C") or k in use]
  kernel = lambda *a: mosaic.selective_scan(**dict(zip(names, a)), delta_softplus=softplus,
                                            segment_ids=segment_ids, config=config, interpret=True)
  (y, last), vjp = jax.vjp(kernel, *(jnp.asarray(x[k]) for k in names))
  r = np.random.default_rng(seeds.draw())
  cts = (r.normal(size=y.shape).astype(np.float32), r.normal(size=last.shape).astype(np.float32))
  grads = vjp(tuple(map(jnp.asarray, cts)))
  with jax.enable_x64(True):
    ref = lambda *a: oracle.jax64_scan(**dict(zip(names, a)), delta_softplus=softplus,
                                       segment_ids=segment_ids)
    (y64, last64), vjp64 = jax.vjp(ref, *(np.float64(x[k]) for k in names))
    grads64 = vjp64(tuple(map(np.float64, cts)))
  errors = {"y": oracle.rel_err(y, y64), "last_state": oracle.rel_err(last, last64)}
  errors.update({"d" + k: oracle.rel_err(g, g64) for k, g, g64 in zip(names, grads, grads64)})
  assert all(e < tol for e in errors.values()), errors


def test_every_option_at_a_ragged_length():
  check((1, 37, 5, 4, 1))


@pytest.mark.parametrize("warpgroups", [1, 2])
def test_segments_groups_and_channel_padding(warpgroups):
  # 4 tiles in uneven segments in both directions; 2 groups of 65 channels, each padded to its
  # own 128-channel block. With two backward warpgroups each takes 4 of the 8 states (6 padded)
  # and the second hands its partial sums to the first per sub-tile.
  check((2, 100, 130, 6, 2), config=mosaic.Config(segments=3, bwd_segments=3, stages=2,
                                                  bwd_warpgroups=warpgroups))


def test_backward_warpgroups_checked():
  x = make_inputs(1, 37, 5, 4, 1)
  run = lambda **kw: mosaic.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"],
                                           config=mosaic.Config(**kw), interpret=True)
  with pytest.raises(ValueError, match="bwd_warpgroups must be 1 or 2; got 3"):
    run(bwd_warpgroups=3)
  with pytest.raises(ValueError, match="sub must be even"):
    run(bwd_warpgroups=2, sub=1)
  with pytest.raises(ValueError, match="early_pair applies to one backward warpgroup"):
    run(bwd_warpgroups=2, early_pair=True)


def test_dbc_partial_sums_over_the_states_or_to_their_own_output(monkeypatch):
  # The two-warpgroup backward writes its dB/dC partial sums over the saved states it has read;
  # inside shard_map (no refs there) to an output of their own. Both give the oracle's gradients;
  # on one draw they agree bit for bit, and two backward runs from one forward give the same.
  # Kernels with two warpgroups run eagerly here: inside a larger jit the interpreter's threads
  # hung on a 2-core machine.
  cfg = mosaic.Config(bwd_warpgroups=2, bwd_segments=2, stages=2)
  check((1, 40, 5, 8, 1), config=cfg)
  x = make_inputs(1, 40, 5, 8, 1)
  f = lambda u, dt, B: mosaic.selective_scan(
      u, dt, x["A"], B, x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True,
      config=cfg, interpret=True)[0]
  args = tuple(jnp.asarray(x[k]) for k in ("u", "delta", "B"))
  r = np.random.default_rng(seeds.draw())
  ct = jnp.asarray(r.normal(size=(1, 40, 5)).astype(np.float32))
  _, vjp = jax.vjp(f, *args)
  first, second = vjp(ct), vjp(ct)
  monkeypatch.setattr(mosaic, "_dbc_in_place", lambda states: False)
  jax.clear_caches()
  check((1, 40, 5, 8, 1), config=cfg)
  _, vjp_rows = jax.vjp(f, *args)
  rows = vjp_rows(ct)
  jax.clear_caches()
  for a, b, c in zip(first, second, rows):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_one_state_no_options_no_softplus():
  check((2, 37, 6, 1, 2), use=(), softplus=False)


def test_states_beyond_one_kernel_run_as_slices():
  check((1, 40, 8, 20, 2), use=("D", "z", "initial_state"))


@pytest.mark.parametrize("reset_tiles", [False, True], ids=["bias", "tile_branch"])
def test_segment_ids_at_tile_and_segment_edges(reset_tiles):
  # 4 tiles of 32 in segments of 2 tiles (forward and backward): documents of length 1 first and
  # last, boundaries at a tile edge (32), a segment edge (64) and one token past it; the second
  # row is one document, so its state crosses the segment edges (with reset_tiles its tiles take
  # the branch without the reset bias, the first row's the one with it).
  check((2, 100, 5, 4, 1), config=mosaic.Config(segments=2, bwd_segments=2, stages=2,
                                                reset_tiles=reset_tiles),
        segment_ids=oracle.segment_ids_from_starts(100, [1, 32, 64, 65, 99], []))


def test_segment_ids_with_state_slices_and_groups():
  check((1, 37, 8, 20, 2), use=("D", "z", "initial_state"),
        segment_ids=oracle.segment_ids_from_starts(37, [5, 6, 36]))


@pytest.mark.parametrize("ids, match", [
    (np.zeros((1, 36), np.int32), r"segment_ids must be \(1, 37\) integers; got \(1, 36\) int32"),
    (np.zeros((1, 37), np.float32), r"segment_ids must be \(1, 37\) integers; got \(1, 37\) "
                                    r"float32")])
def test_segment_ids_checked(ids, match):
  x = make_inputs(1, 37, 5, 4, 1)
  with pytest.raises(ValueError, match=match):
    mosaic.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], segment_ids=ids,
                          interpret=True)


def test_minus_inf_A_stays_finite():
  x = make_inputs(1, 37, 5, 4, 1)
  A = jnp.asarray(x["A"]).at[:, 0].set(-jnp.inf)
  f = lambda u, delta: mosaic.selective_scan(u, delta, A, x["B"], x["C"], x["D"], x["z"],
                                             x["delta_bias"], delta_softplus=True, interpret=True)
  (y, last), vjp = jax.vjp(f, jnp.asarray(x["u"]), jnp.asarray(x["delta"]))
  for a in (y, last, *vjp((jnp.ones_like(y), jnp.ones_like(last)))):
    assert bool(jnp.all(jnp.isfinite(a)))


def test_segments_from_the_cost_model():
  # Few blocks and a long sequence: split until the SMs are busy; many blocks: no split.
  assert mosaic.choose_segments(16, 1024, 132, 0.6) >= 4
  assert mosaic.choose_segments(128, 64, 132, 0.6) == 1
  assert mosaic.choose_segments(16, 1, 132, 0.6) == 1
  # The backward's cheaper pre-pass, up to 4 CTAs per SM: 96 CTAs of 64 tiles (130m-train) run as
  # 3 waves of 16 tiles on all 132 SMs; 128 CTAs (1.4b-train) already fill them.
  assert mosaic.choose_segments(96, 64, 132, 0.25, 2.0, 4) == 4
  assert mosaic.choose_segments(128, 64, 132, 0.25, 2.0, 4) == 1


def test_unsupported_reason():
  x = make_inputs(1, 8, 4, 4, 1)
  args = lambda **kw: [jnp.asarray(kw.get(k, x[k])) for k in ("u", "delta", "A", "B", "C")]
  assert mosaic.unsupported_reason(*args()) is None
  assert "complex" in mosaic.unsupported_reason(*args(A=x["A"].astype(np.complex64)))
  assert "exceeds" in mosaic.unsupported_reason(*args(A=np.zeros((4, 300), np.float32)))


@pytest.mark.parametrize("case", ["every-option", "packed", "packed-reset-tiles", "early-pair",
                                  "state-slices", "long-segments"])
def test_kernels_lower_for_the_gpu(case):
  # Mosaic GPU's own lowering, forward and backward, run on the CPU: the interpreter above accepts
  # things the GPU lowering does not (layouts, unsupported ops), and this is what the GPU compiles.
  # The non-default blockings too (reset_tiles, early_pair: the latter only outside the interpreter).
  b, l, d, n, g = {"every-option": (2, 37, 5, 3, 1), "packed": (2, 100, 130, 16, 2),
                   "packed-reset-tiles": (2, 100, 130, 16, 2), "early-pair": (1, 70, 130, 16, 1),
                   "state-slices": (1, 40, 8, 40, 1), "long-segments": (1, 4096, 128, 16, 1)}[case]
  config = mosaic.Config(reset_tiles=case == "packed-reset-tiles", early_pair=case == "early-pair")
  bf, f32 = jnp.bfloat16, jnp.float32
  s = jax.ShapeDtypeStruct
  args = (s((b, l, d), bf), s((b, l, d), bf), s((d, n), f32), s((b, l, g, n), bf),
          s((b, l, g, n), bf), s((d,), f32), s((b, l, d), bf), s((d,), f32), s((b, d, n), f32))
  ids = s((b, l), jnp.int32) if case.startswith("packed") else None

  def loss(*a):
    y, last = mosaic.selective_scan(*a[:9], delta_softplus=True, segment_ids=a[9] if ids else None,
                                    config=config)
    return y.astype(f32).sum() + last.sum()

  grad = jax.grad(loss, argnums=tuple(range(9)))
  lowered = jax.jit(grad).trace(*args, *([ids] if ids else [])).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_lowering_semantics_are_checked():
  assert mosaic.Config().lowering == "lane"
  x = make_inputs(1, 8, 4, 4, 1)
  with pytest.raises(ValueError, match=r"Config.lowering must be one of \('lane', 'warpgroup'\)"):
    mosaic.selective_scan(*(jnp.asarray(x[k]) for k in ("u", "delta", "A", "B", "C")),
                          config=mosaic.Config(lowering="tile"), interpret=True)
