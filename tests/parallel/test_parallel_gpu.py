"""Sequence parallelism with the fused kernel on several GPUs against one GPU.

``ssmax.parallel.selective_scan(backend="pallas")`` with the length split over every visible GPU
(mesh ``data=1, seq=N``) must give the one-GPU fused kernel's y, last state and all nine gradients
(float32, relative error < 1e-5), with and without packed documents (one boundary placed on a shard
edge), and a 2-layer MambaLM's sequence-parallel loss and gradients must equal one GPU's (relative
error < 1e-4: the parameters' gradients are float32 sums over every token of both layers, added
in another order; on two H100s the embedding's differed by 4.9e-5).

Deselected by default; on a machine with two or more GPUs::

  pytest -m gpu tests/parallel/test_parallel_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ssmax
from benchmarks.harness import rel_err
from benchmarks.scan_inputs import make_inputs, packed_segment_ids, split
from ssmax import nn as snn
from ssmax import parallel

pytestmark = pytest.mark.gpu
TOL = 1e-5
MODEL_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def gpus():
  if jax.default_backend() != "gpu" or jax.device_count() < 2:
    pytest.skip("needs two or more GPUs")


def _scan_fn(static, names, mesh=None):
  def run(*a):
    kw = dict(zip(names, a), **static, return_last_state=True, backend="pallas")
    return (ssmax.selective_scan(**kw) if mesh is None
            else parallel.selective_scan(mesh, **kw, data_axis=None))

  def fwd_bwd(*a):
    (y, last), vjp = jax.vjp(run, *a)
    wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape).astype(y.dtype)
    wl = jnp.sin(jnp.arange(last.size, dtype=jnp.float32)).reshape(last.shape)
    return y, last, vjp((wy, wl))

  return jax.jit(fwd_bwd)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("shape", [(2, 4096, 256, 16), (1, 2 * 1000, 40, 7)],
                         ids=["2x4096x256x16", "1x2000x40x7"])
def test_sequence_parallel_fused_kernel_matches_one_gpu(shape, packed):
  n = jax.device_count()
  b, l, d, st = shape
  l = l // n * n
  kw = make_inputs(jax.random.PRNGKey(3), b, l, d, st, jnp.float32, with_state=True)
  if packed:
    ids = packed_segment_ids(jax.random.PRNGKey(4), b, l, 300.0)
    edge = l // n  # a document starts exactly at the first shard edge
    ids = ids.at[:, edge:].add(1000)
    kw["segment_ids"] = ids
  names, args, static = split(kw)
  mesh = parallel.make_mesh(1, n)
  ref = _scan_fn(static, names)(*args)
  got = _scan_fn(static, names, mesh)(*args)
  errors = {"y": rel_err(got[0], ref[0]), "last_state": rel_err(got[1], ref[1])}
  errors |= {f"d{k}": rel_err(a, r) for k, a, r in zip(names, got[2], ref[2])}
  print(f"{n} GPUs, worst rel. error {max(errors.values()):.2e}: {errors}")
  assert len(errors) == 2 + len(names)
  assert all(e < TOL for e in errors.values()), errors


def test_sequence_parallel_training_step_matches_one_gpu():
  n = jax.device_count()
  config = snn.MambaConfig(d_model=64, n_layer=2, vocab_size=101, d_state=16,
                           scan_backend="pallas")
  model = snn.MambaLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 101, (2, 512 * n + 1)).astype(np.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_of(graphdef):
    def loss(params, inputs, targets):
      logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum() / targets.size
    return loss

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_of(graphdef)))(params, inputs, targets)
  sharded = snn.MambaLM(snn.MambaConfig(**{**vars(config), "sequence_axis": "seq"}),
                        rngs=nnx.Rngs(0))
  sgraph, sparams = nnx.split(sharded)
  mesh = parallel.make_mesh(1, n)
  local = lambda p, x, t: loss_of(sgraph)(p, x, t) * (x.size / inputs.size)
  loss, grads = jax.jit(parallel.value_and_grad(local, mesh))(sparams, inputs, targets)
  errors = {"loss": rel_err(loss, ref_loss)}
  errors |= {jax.tree_util.keystr(k): rel_err(g, r) for (k, g), r in
             zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads))}
  worst = max(errors, key=errors.get)
  assert errors["loss"] < TOL and errors[worst] < MODEL_TOL, (worst, errors[worst], errors)
