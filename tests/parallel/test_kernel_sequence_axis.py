"""The fused kernel's own sequence parallelism (``sequence_axis``), in Mosaic GPU's interpreter.

Several CPU devices cannot run the interpreter at once, so shards are emulated with
``jax.vmap(..., axis_name=...)``, which binds the collectives the kernel uses: the forward over
2 and 3 shards (ragged shard tiles, a document starting exactly at a shard edge, sequence
segments inside each shard) against one call and the float64 loop. A custom VJP's backward does
not see vmap's axis, so the backward is checked on a 1 x 1 mesh inside ``shard_map`` (the whole
pre-pass of both directions and the chaining run there), and the cross-shard chaining of the
cotangent (through :func:`ssmax.sharding.pass_state` in either direction) on its own over 3
emulated shards against NumPy loops. The GPU check with two real
devices is tests/parallel/test_parallel_gpu.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oracle import jax64_scan, random_inputs, rel_err, segment_ids_from_starts
from ssmax import parallel, sharding
from ssmax.pallas import selective_scan_mosaic as mosaic

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
CONFIG = mosaic.Config(segments=2, bwd_segments=2)


def _args(kw):
  out = dict(kw)
  out["B"], out["C"] = kw["B"][:, :, None], kw["C"][:, :, None]  # canonical (b, l, groups, n)
  return [jnp.asarray(out[k]) for k in NAMES]


def _shards(x, n):
  """(b, l, ...) -> (n, b, l / n, ...)."""
  return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


@pytest.mark.parametrize("shards,length", [(2, 130), (3, 150)])
def test_forward_over_emulated_shards(seed, shards, length):
  kw = random_inputs(seed, b=2, l=length, d=5, n=3)
  edge = length // shards
  ids = segment_ids_from_starts(length, [edge, edge + 7], [3, 2 * edge - 1])
  u, delta, A, B, C, D, z, bias, h0 = _args(kw)

  def shard(u, delta, B, C, z, ids):
    return mosaic.selective_scan(u, delta, A, B, C, D, z, bias, h0, delta_softplus=True,
                                 segment_ids=ids, interpret=True, config=CONFIG,
                                 sequence_axis="seq")

  y, last = jax.jit(jax.vmap(shard, axis_name="seq"))(
      *(_shards(x, shards) for x in (u, delta, B, C, z, jnp.asarray(ids))))
  y = jnp.moveaxis(y, 0, 1).reshape(u.shape)
  one_y, one_last = mosaic.selective_scan(u, delta, A, B, C, D, z, bias, h0, delta_softplus=True,
                                          segment_ids=ids, interpret=True, config=CONFIG)
  with jax.enable_x64(True):
    want_y, want_last = jax64_scan(**kw, segment_ids=ids)
  assert rel_err(y, one_y) < 1e-6 and rel_err(y, want_y) < 1e-5
  for k in range(shards):  # every shard holds the state after the last one
    assert rel_err(last[k], one_last) < 1e-6 and rel_err(last[k], want_last) < 1e-5


def test_gradients_through_the_shard_path_on_one_device(seed):
  kw = random_inputs(seed, b=2, l=100, d=5, n=3)
  ids = segment_ids_from_starts(100, [33, 64], [1])
  mesh = parallel.make_mesh(data=1, seq=1)
  args = _args(kw)

  def loss(sequence_axis, *a):
    y, last = mosaic.selective_scan(*a, delta_softplus=True, segment_ids=ids, interpret=True,
                                    config=CONFIG, sequence_axis=sequence_axis)
    return jnp.sum(jnp.cos(y) * y) + jnp.sum(jnp.sin(last)), (y, last)

  seq = lambda x: P(None, "seq") if x.ndim >= 3 and x.shape[1] == 100 else P()
  specs = tuple(seq(a) for a in args)
  mapped = jax.shard_map(lambda *a: jax.lax.psum(loss("seq", *a)[0], "seq"), mesh=mesh,
                         in_specs=specs, out_specs=P())
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  got = jax.jit(jax.grad(mapped, argnums=tuple(range(9))))(*placed)
  want = jax.jit(jax.grad(lambda *a: loss(None, *a)[0], argnums=tuple(range(9))))(*args)
  for name, g, w in zip(NAMES, got, want):
    assert rel_err(g, w) < 1e-6, name


def test_cotangent_chains_back_across_shards(rng):
  shards, shape = 3, (2, 4, 5)
  decay, g_start, dlast = (rng.uniform(0.2, 1.0, (shards, *shape)).astype(np.float32)
                           for _ in range(3))
  got = jax.vmap(lambda d, g, l: mosaic._cotangent_at_end(d, g, l, "seq"), axis_name="seq")(
      decay, g_start, dlast)
  want = np.zeros_like(dlast)
  after = np.zeros(shape, np.float32)  # cotangent entering shard j + 1 at its start
  for j in reversed(range(shards)):
    want[j] = dlast[j] + after
    after = decay[j] * want[j] + g_start[j]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_pass_state_chains_shards_in_either_direction(rng, reverse):
  shards, shape = 3, (2, 5, 3)
  decay, last = (rng.uniform(0.2, 1.0, (shards, *shape)) for _ in range(2))
  h0 = rng.normal(size=shape)
  entering, final = jax.vmap(
      lambda d, l: sharding.pass_state(d, l, "seq", jnp.asarray(h0), reverse=reverse),
      axis_name="seq")(decay, last)
  want = np.zeros_like(last)
  h = h0
  for j in (reversed(range(shards)) if reverse else range(shards)):
    want[j] = h
    h = decay[j] * h + last[j]
  np.testing.assert_allclose(entering, want, rtol=1e-6)
  np.testing.assert_allclose(final, np.broadcast_to(h, final.shape), rtol=1e-6)


@pytest.mark.parametrize("shards", [1, 3])
def test_segment_starts_over_emulated_shards_against_a_loop(rng, shards):
  # Odd sizes; documents that start at a shard edge, cross one, and have length 1.
  b, l = 2, 7
  ids = np.cumsum(rng.uniform(size=(b, shards * l)) < 0.3, axis=1).astype(np.int32)
  if shards > 1:
    ids[0, l:] += 5  # a document starts at the first edge
    ids[1, l - 1:l + 1] = ids[1, l - 2]  # one continues across it
    ids[1, l + 1:] = np.maximum(ids[1, l + 1:], ids[1, l])
  want = np.zeros(ids.shape, bool)
  for r in range(b):
    for t in range(1, ids.shape[1]):
      want[r, t] = ids[r, t] != ids[r, t - 1]
  pieces = jnp.asarray(ids.reshape(b, shards, l).transpose(1, 0, 2))
  got = jax.vmap(lambda x: sharding.segment_starts(x, "seq"), axis_name="seq")(pieces)
  np.testing.assert_array_equal(np.asarray(got).transpose(1, 0, 2).reshape(b, -1), want)
  np.testing.assert_array_equal(sharding.segment_starts(jnp.asarray(ids)), want)  # no axis


def test_segment_starts_rejects_bad_ids():
  with pytest.raises(ValueError, match="segment_ids must be integers"):
    sharding.segment_starts(jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="segment_ids"):
    sharding.segment_starts(jnp.zeros((2, 5, 1), jnp.int32))
  with pytest.raises(ValueError, match="at least one position"):
    sharding.segment_starts(jnp.zeros((2, 0), jnp.int32))
