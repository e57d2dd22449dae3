"""Packed documents (``segment_ids``) in ssmax.selective_scan: a packed row equals its documents
scanned one by one by the float64 references (outputs, last states, gradients), on one device and
with the length split over 4 devices (boundaries at shard edges; worker in segments_worker.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmax
from ssmax.scan import dispatch, segments
from oracle import jax64_scan, numpy_scan, random_inputs, rel_err
from oracle import segment_ids_from_starts as ids_from_starts

BACKENDS = ["sequential", "associative"]
SCAN_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
PER_STEP = ("u", "delta", "z", "B", "C")


def documents(seg_row):
  """``[(start, end), ...]`` of one row of segment ids."""
  starts = [0] + [t for t in range(1, len(seg_row)) if seg_row[t] != seg_row[t - 1]]
  return list(zip(starts, starts[1:] + [len(seg_row)]))


def one_by_one(scan, kw, seg):
  """``scan`` (numpy_scan or jax64_scan) run on every document alone: ``y`` assembled over the
  row and the last state of each row's last document; ``initial_state`` feeds first documents."""
  xp = jnp if scan is jax64_scan else np
  ys, lasts = [], []
  for b in range(seg.shape[0]):
    row = []
    for i, (s, e) in enumerate(documents(seg[b])):
      doc = {k: (v[b:b + 1, s:e] if k in PER_STEP else v) for k, v in kw.items()}
      doc["initial_state"] = (kw["initial_state"][b:b + 1]
                              if i == 0 and kw.get("initial_state") is not None else None)
      y, last = scan(**doc)
      row.append(y)
    ys.append(xp.concatenate(row, axis=1))
    lasts.append(last)
  return xp.concatenate(ys, axis=0), xp.concatenate(lasts, axis=0)


# Rows of 37 steps: mixed lengths with documents of length 1 at the start, inside and at the end;
# one document; every position its own document.
LAYOUTS = {
    "mixed": lambda: ids_from_starts(37, [1, 2, 10, 11, 30, 36], [17]),
    "one_document": lambda: ids_from_starts(37, [], []),
    "all_length_one": lambda: ids_from_starts(37, range(1, 37), range(1, 37)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", [None, 5])
def test_packed_row_equals_documents_one_by_one(backend, layout, groups, seed):
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=groups)
  seg = LAYOUTS[layout]()
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend, segment_ids=seg)
  y_ref, last_ref = one_by_one(numpy_scan, kw, seg)
  assert y.shape == (2, 37, 5) and last.shape == (2, 5, 3)
  assert rel_err(y, y_ref) < 2e-4
  assert rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_complex_a(backend, seed):
  kw = random_inputs(seed, b=2, l=13, d=5, n=3, complex_a=True)
  seg = ids_from_starts(13, [1, 6], [12])
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend=backend, segment_ids=seg)
  y_ref, last_ref = one_by_one(numpy_scan, kw, seg)
  assert last.dtype == jnp.complex64
  assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4


_GRADS64 = {}  # the float64 oracle's gradients, slow to compute: once per inputs


def float64_gradients(kw, seg, wy, ws):
  """Gradients of ``sum(y * wy) + sum(last * ws)`` over the documents run one by one by the
  float64 jax loop (an implementation sharing no code with ssmax), cached per inputs."""
  key = (seg.tobytes(), kw["u"].tobytes(), np.asarray(wy).tobytes())
  if key not in _GRADS64:
    with jax.enable_x64(True):
      def loss(*args):
        y, last = one_by_one(jax64_scan, dict(zip(SCAN_NAMES, args), delta_softplus=True), seg)
        return jnp.sum(y * wy) + jnp.sum(last * ws)

      grads = jax.grad(loss, argnums=tuple(range(9)))(
          *[jnp.asarray(kw[k], jnp.float64) for k in SCAN_NAMES])
      _GRADS64[key] = [np.asarray(g) for g in grads]
  return _GRADS64[key]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_gradients_equal_documents_one_by_one_float64(backend):
  import seeds

  seed = seeds.BASE + 17  # the same inputs for both backends: the oracle runs once
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=5)
  seg = LAYOUTS["mixed"]()
  rng = np.random.default_rng(seed + 1)
  wy, ws = rng.normal(size=(2, 37, 5)), rng.normal(size=(2, 5, 3))

  def loss(*args):
    y, last = ssmax.selective_scan(**dict(zip(SCAN_NAMES, args)), delta_softplus=True,
                                   return_last_state=True, backend=backend, segment_ids=seg)
    return jnp.sum(y * wy.astype(np.float32)) + jnp.sum(last * ws.astype(np.float32))

  args = [jnp.asarray(kw[k]) for k in SCAN_NAMES]
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(9))))(*args)
  grads64 = float64_gradients(kw, seg, wy, ws)
  for name, g, g64 in zip(SCAN_NAMES, grads, grads64):
    assert g.shape == g64.shape, name
    assert np.all(np.isfinite(np.asarray(g))), name
    assert rel_err(g, g64) < 1e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_changes_of_id_matter(backend, seed):
  kw = random_inputs(seed, b=2, l=12, d=5, n=3)
  a = np.array([[0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]] * 2, np.int32)
  b = np.array([[7, 7, 3, 3, 3, 7, 7, 7, 7, -1, -1, -1]] * 2, np.int64)  # relabelled, reused
  ya = ssmax.selective_scan(**kw, backend=backend, segment_ids=a)
  yb = ssmax.selective_scan(**kw, backend=backend, segment_ids=b)
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))
  # One id throughout is the plain scan.
  np.testing.assert_array_equal(
      np.asarray(ssmax.selective_scan(**kw, backend=backend, segment_ids=np.ones((2, 12), int))),
      np.asarray(ssmax.selective_scan(**kw, backend=backend)))


def test_packed_under_jit_and_vmap(seed):
  kw = random_inputs(seed, b=3, l=10, d=5, n=3)
  seg = ids_from_starts(10, [4], [1, 9], [])
  arrays = {k: v for k, v in kw.items() if k != "delta_softplus"}
  shared = ("A", "D", "delta_bias")

  def one(a, s):
    a = {k: v if k in shared else v[None] for k, v in a.items()}
    return ssmax.selective_scan(**a, delta_softplus=True, segment_ids=s[None])[0]

  axes = {k: (None if k in shared else 0) for k in arrays}
  y = jax.jit(jax.vmap(one, in_axes=(axes, 0)))(arrays, seg)
  assert rel_err(y, one_by_one(numpy_scan, kw, seg)[0]) < 2e-4


def test_fused_kernel_takes_segment_ids(seed):
  """backend="pallas" (Mosaic GPU's interpreter here) through the public API: outputs and last
  state equal the documents one by one; the kernel's own oracle tests (gradients, tile and segment
  edges) are in tests/kernels/test_selective_scan_mosaic.py."""
  kw = random_inputs(seed, b=2, l=37, d=5, n=3, groups=5)
  seg = LAYOUTS["mixed"]()
  x = ssmax.scan.check_inputs(**{k: kw[k] for k in SCAN_NAMES}, segment_ids=seg)
  assert dispatch.kernel_unsupported_reason(x) is None
  y, last = ssmax.selective_scan(**kw, return_last_state=True, backend="pallas", segment_ids=seg)
  y_ref, last_ref = one_by_one(numpy_scan, kw, seg)
  assert rel_err(y, y_ref) < 2e-4 and rel_err(last, last_ref) < 2e-4


@pytest.mark.parametrize("segment_ids, match", [
    (np.zeros((2, 5, 1), np.int32), r"segment_ids must have rank 2 \(batch, length\); got shape "
                                    r"\(2, 5, 1\)"),
    (np.zeros((2, 6), np.int32), r"segment_ids must have shape \(2, 5\)"),
    (np.zeros((1, 5), np.int32), r"segment_ids must have shape \(2, 5\)"),
    (np.zeros((2, 5), np.float32), r"segment_ids must have an integer dtype; got float32"),
])
def test_segment_ids_errors_name_the_argument(segment_ids, match):
  kw = random_inputs(0, b=2, l=5, d=4, n=3)
  with pytest.raises(ValueError, match=match):
    ssmax.selective_scan(**kw, segment_ids=segment_ids)


def test_segment_ids_from_lengths_and_cu_seqlens():
  ids = ssmax.scan.segment_ids_from_lengths(np.array([[3, 1, 0, 2], [1, 1, 1, 1]]), 8)
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 3, 3, 4, 4], [0, 1, 2, 3, 4, 4, 4, 4]])
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(ssmax.scan.segment_ids_from_lengths(np.array([2, 3]), 5),
                                [[0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(ssmax.scan.segment_ids_from_cu_seqlens(np.array([0, 3, 4, 7])),
                                [[0, 0, 0, 1, 2, 2, 2]])
  jitted = jax.jit(ssmax.scan.segment_ids_from_lengths, static_argnums=1)
  np.testing.assert_array_equal(jitted(jnp.array([[2, 1]]), 4), [[0, 0, 1, 2]])
  with pytest.raises(ValueError, match=r"lengths must be >= 0 and add up to at most length=4"):
    ssmax.scan.segment_ids_from_lengths(np.array([3, 2]), 4)
  with pytest.raises(ValueError, match=r"lengths must have an integer dtype"):
    ssmax.scan.segment_ids_from_lengths(np.array([3.0]), 4)
  with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and not decrease"):
    ssmax.scan.segment_ids_from_cu_seqlens(np.array([0, 3, 2]))


def test_window_mask_stops_at_boundaries():
  seg = jnp.array([[0, 0, 1, 1, 1, 2]])
  mask = segments.window_mask(seg, 3)
  # mask[t, j]: input t - (2 - j) in t's document; the left context continues document 0.
  want = [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]]
  np.testing.assert_array_equal(mask[0], np.array(want, bool))


# ----------------------------------------------------------------------------------------------
# Sequence parallel: 4 fake CPU devices in a subprocess (segments_worker.py).

# 36 steps in 4 shards of 9: boundaries at shard edges (9, 18, 27), a length-1 document at a
# shard's first step (18), a document spanning two shard edges (row 1: 5 .. 35) and one of
# length 1 at the very end; row 2 has no boundary.
SP_SEGMENTS = ids_from_starts(36, [9, 18, 19, 27, 30], [5, 35], [])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  import seeds

  out = tmp_path_factory.mktemp("segments")
  seed = seeds.draw()
  data = random_inputs(seed, b=3, l=36, d=5, n=3, groups=5)
  rng = np.random.default_rng(seed + 1)
  data["wy"] = rng.normal(size=data["u"].shape).astype(np.float32)
  data["wl"] = rng.normal(size=data["initial_state"].shape).astype(np.float32)
  data["segment_ids"] = SP_SEGMENTS
  data["x"] = rng.normal(size=(3, 36, 5)).astype(np.float32)
  np.savez(out / "in.npz", **{k: v for k, v in data.items() if k != "delta_softplus"})
  worker_py = os.path.join(os.path.dirname(__file__), "segments_worker.py")
  proc = subprocess.run([sys.executable, worker_py, str(out)], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(__file__))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return data, dict(np.load(out / "results.npz")), json.loads((out / "errors.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_parallel_packed_equals_documents_one_by_one(worker, backend):
  data, results, _ = worker
  kw = {k: data[k] for k in SCAN_NAMES}
  y_ref, last_ref = one_by_one(numpy_scan, dict(kw, delta_softplus=True), SP_SEGMENTS)
  assert rel_err(results[f"{backend}/multi/y"], y_ref) < 2e-4
  assert rel_err(results[f"{backend}/multi/last"], last_ref) < 2e-4
  for what in ("y", "last"):
    assert rel_err(results[f"{backend}/multi/{what}"], results[f"{backend}/single/{what}"]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_parallel_packed_gradients(worker, backend):
  data, results, _ = worker
  grads64 = float64_gradients(data, SP_SEGMENTS, data["wy"], data["wl"])
  for name, g64 in zip(SCAN_NAMES, grads64):
    multi = results[f"{backend}/multi/grad_{name}"]
    assert rel_err(multi, np.asarray(g64)) < 1e-3, name
    assert rel_err(multi, results[f"{backend}/single/grad_{name}"]) < 1e-5, name


@pytest.mark.parametrize("layer", ["mixer", "s4d", "s4"])
def test_sequence_parallel_packed_layers_match_one_device(worker, layer):
  # One device is checked against documents run one by one in tests/nn/test_packed.py.
  _, results, _ = worker
  keys = [k for k in results if k.startswith(f"{layer}/single")]
  assert keys
  for k in keys:
    multi = results[k.replace("/single", "/multi")]
    assert multi.shape == results[k].shape, k
    assert rel_err(multi, results[k]) < 1e-5, k


def test_sequence_parallel_segment_ids_errors(worker):
  errors = worker[2]
  assert "length (axis 1) must be divisible by the size 4" in errors["not_divisible"]
