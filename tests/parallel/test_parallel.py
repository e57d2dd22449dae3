"""ssmax.parallel and selective_scan(sequence_axis=...) on 4 fake CPU devices.

The multi-device part needs XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is
imported, which the pytest process has already done with one device. So this file also runs as a
script: the `worker` fixture starts it once per session in a subprocess (``--worker DIR``) on
inputs drawn here; the subprocess writes every multi-device result to DIR and the tests below
compare them with float64 references (NumPy loop, float64 jax gradients) computed here, and with
the same computation on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 4
SCAN_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
BACKENDS = ["sequential", "associative"]
# The training-step test's model; 4 x 18 tokens split (2 data) x (2 seq), 9 a shard >= d_conv - 1.
MODEL = dict(d_model=6, n_layer=1, vocab_size=37, d_state=3, d_conv=3, expand=2,
             scan_backend="sequential")
# Scan cases: name -> (mesh (data, seq), random_inputs kwargs, backends, with gradients); the
# length is split over "seq" except in "data4" (sequence_axis=None, batch split only). Few cases:
# every one costs compilations, and the 4 devices share this machine's cores.
SCAN_CASES = {
    "seq4": ((1, 4), dict(b=2, l=36, d=5, n=3, groups=5), BACKENDS, True),
    "data2_seq2": ((2, 2), dict(b=2, l=38, d=5, n=3, groups=None), ["sequential"], False),
    "data4": ((4, 1), dict(b=4, l=37, d=5, n=3, groups=None), ["associative"], True),
    "complex_seq4": ((1, 4), dict(b=1, l=36, d=5, n=3, complex_a=True), ["sequential"], False),
}


# ----------------------------------------------------------------------------------------------
# The subprocess: everything that needs several devices.


def _worker(out_dir: str) -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={DEVICES}")
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P

  import ssmax
  from ssmax import parallel

  assert jax.device_count() == DEVICES, jax.devices()
  results, errors = {}, {}
  for case, (mesh_shape, _, backends, with_grads) in SCAN_CASES.items():
    data = np.load(os.path.join(out_dir, f"in_{case}.npz"))
    kw = {k: data[k] for k in SCAN_NAMES if k in data}
    mesh = parallel.make_mesh(*mesh_shape)
    for backend in backends:
      named = lambda a: dict(zip(SCAN_NAMES, a), delta_softplus=True, return_last_state=True,
                             backend=backend)
      seq_axis = None if case == "data4" else "seq"
      multi = lambda *a: parallel.selective_scan(mesh, **named(a), sequence_axis=seq_axis)
      single = lambda *a: ssmax.selective_scan(**named(a))
      args = [jnp.asarray(kw[k]) for k in SCAN_NAMES]
      for tag, fn in (("multi", multi), ("single", single)):
        if with_grads:  # outputs and gradients from one compiled function
          def loss(*a, fn=fn):
            y, last = fn(*a)
            return jnp.sum(y * data["wy"]) + jnp.sum(last * data["wl"]), (y, last)

          (_, (y, last)), grads = jax.jit(jax.value_and_grad(
              loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
          for name, g in zip(SCAN_NAMES, grads):
            results[f"{case}/{backend}/{tag}/grad_{name}"] = g
        else:
          y, last = jax.jit(fn)(*args)
        results[f"{case}/{backend}/{tag}/y"] = y
        results[f"{case}/{backend}/{tag}/last"] = last

  # The collectives on a known input: x[b, t, c] = 100 b + 10 t + c, length 4 * 3.
  mesh = parallel.make_mesh(1, DEVICES)
  x = jnp.asarray(np.arange(2)[:, None, None] * 100 + np.arange(12)[None, :, None] * 10
                  + np.arange(3)[None, None, :], jnp.float32)
  first = -jnp.ones((2, 2, 3), jnp.float32)
  seq = P(None, "seq")
  smap = lambda f, out=seq: jax.shard_map(f, mesh=mesh, in_specs=seq, out_specs=out)
  results["halo"] = smap(lambda a: parallel.sequence_halo(a, 2, "seq"))(x)
  results["halo_first"] = smap(lambda a: parallel.sequence_halo(a, 2, "seq", first))(x)
  results["gather_then_piece"] = smap(
      lambda a: parallel.local_piece(parallel.gather_sequence(a, "seq") * 2.0, "seq"))(x)
  results["gathered"] = smap(lambda a: parallel.gather_sequence(a, "seq")[None], P("seq"))(x)
  results["last_shard"] = smap(lambda a: parallel.last_shard(a[:, -1], "seq"), P())(x)

  # Error messages that need a sharded mesh.
  def error(name, fn):
    try:
      fn()
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)

  kw = {k: jnp.asarray(v) for k, v in np.load(os.path.join(out_dir, "in_seq4.npz")).items()
        if k in SCAN_NAMES}
  cut = {k: (v[:, :35] if v.ndim >= 3 and k != "initial_state" else v) for k, v in kw.items()}
  error("length_not_divisible", lambda: parallel.selective_scan(mesh, **cut))
  mesh22 = parallel.make_mesh(2, 2)
  odd_batch = {k: (v[:1] if v.ndim >= 3 else v) for k, v in kw.items()}
  error("batch_not_divisible", lambda: parallel.selective_scan(mesh22, **odd_batch))
  error("axis_not_in_mesh", lambda: parallel.selective_scan(mesh, **kw, sequence_axis="time"))
  error("same_axis", lambda: parallel.selective_scan(mesh, **kw, data_axis="seq"))
  error("pallas_sequence_axis", lambda: parallel.selective_scan(mesh, **kw, backend="pallas"))
  error("halo_too_wide", lambda: smap(lambda a: parallel.sequence_halo(a, 4, "seq"))(x))
  error("shard_batch_not_divisible",
        lambda: parallel.shard_batch(mesh22, {"tokens": np.zeros((3, 8), np.int32)}))
  error("make_mesh_too_many", lambda: parallel.make_mesh(2, 4))

  results.update(_model_step(out_dir))
  results.update(_layers(out_dir))

  np.savez(os.path.join(out_dir, "results.npz"), **{k: np.asarray(v) for k, v in results.items()})
  with open(os.path.join(out_dir, "errors.json"), "w") as f:
    json.dump(errors, f)


def _model_step(out_dir: str) -> dict:
  """One SGD step of a tiny MambaLM: on a (data=2, seq=2) mesh and on one device."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from ssmax import nn as snn
  from ssmax import parallel

  tokens = np.load(os.path.join(out_dir, "in_model.npz"))["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  optimizer = optax.sgd(0.5)
  out = {}
  for tag, mesh_shape, axis in (("multi", (2, 2), "seq"), ("single", None, None)):
    config = snn.MambaConfig(**MODEL, sequence_axis=axis)
    graphdef, params = nnx.split(snn.MambaLM(config, rngs=nnx.Rngs(0)))

    n_tokens = targets.size  # global: local_loss sees one shard's piece

    def local_loss(params, inputs, targets):
      logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum() / n_tokens

    if mesh_shape is None:
      value_and_grad = jax.value_and_grad(local_loss)
    else:
      mesh = parallel.make_mesh(*mesh_shape)
      params = parallel.replicate(mesh, params)
      inputs, targets = parallel.shard_batch(mesh, (inputs, targets))
      value_and_grad = parallel.value_and_grad(local_loss, mesh)

    @jax.jit
    def step(params, inputs, targets):
      loss, grads = value_and_grad(params, inputs, targets)
      updates, _ = optimizer.update(grads, optimizer.init(params), params)
      return loss, grads, optax.apply_updates(params, updates)

    loss, grads, new_params = step(params, inputs, targets)
    out[f"model/{tag}/loss"] = loss
    for name, tree in (("grad", grads), ("param", new_params)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[f"model/{tag}/{name}{jax.tree_util.keystr(path)}"] = leaf
  return out


def _layers(out_dir: str) -> dict:
  """Mixers and S4 layers with the length split 4 ways, and on one device (forward, state)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from ssmax import nn as snn
  from ssmax import parallel
  from ssmax.nn.s4 import S4DLayer, S4Layer

  data = np.load(os.path.join(out_dir, "in_layers.npz"))
  mesh = parallel.make_mesh(1, DEVICES)
  seq = P(None, "seq")
  out = {}
  layers = {
      "mixer": lambda axis: snn.MambaMixer(
          snn.MambaConfig(d_model=5, n_layer=1, d_state=3, d_conv=4, expand=2, sequence_axis=axis,
                          scan_backend="sequential"), rngs=nnx.Rngs(1)),
      "s4d": lambda axis: S4DLayer(5, d_state=4, init="lin", sequence_axis=axis,
                                   rngs=nnx.Rngs(1)),
      "s4": lambda axis: S4Layer(5, d_state=4, sequence_axis=axis, rngs=nnx.Rngs(1)),
  }
  for name, build in layers.items():
    x = jnp.asarray(data["x"])
    if name.startswith("mixer"):
      m = build(None)
      state = snn.MixerState(jnp.asarray(data["conv"][:, :m.d_conv]).astype(m.dtype),
                             jnp.asarray(data[f"ssm_{name}"]).astype(m.state_dtype))
      args, specs = (x, state), (seq, P())
      call = lambda m, x, state: m(x, state, return_state=True)
      out_specs = (seq, P())
    elif name == "s4d":
      args, specs = (x, jnp.asarray(data["ssm_s4d"]).astype(jnp.complex64)), (seq, P())
      call = lambda m, x, state: m(x, state, return_state=True)
      out_specs = (seq, P())
    else:
      args, specs = (x,), (seq,)
      call = lambda m, x: m(x)
      out_specs = seq
    graphdef, params = nnx.split(build(None))
    single = jax.jit(lambda params, *a: call(nnx.merge(graphdef, params), *a))(params, *args)
    graphdef, params = nnx.split(build("seq"))
    multi = jax.jit(jax.shard_map(lambda params, *a: call(nnx.merge(graphdef, params), *a),
                                  mesh=mesh, in_specs=(P(), *specs), out_specs=out_specs))(
                                      params, *args)
    for tag, result in (("single", single), ("multi", multi)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(result):
        out[f"layer/{name}/{tag}{jax.tree_util.keystr(path)}"] = leaf
  return out


# ----------------------------------------------------------------------------------------------
# The tests, in the pytest process.


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  import seeds
  from oracle import random_inputs

  out = tmp_path_factory.mktemp("parallel")
  seed = seeds.draw()
  inputs = {}
  for i, (case, (_, kw, _, _)) in enumerate(SCAN_CASES.items()):
    data = random_inputs(seed + i, **kw)
    rng = np.random.default_rng(seed + 100 + i)
    data["wy"] = rng.normal(size=data["u"].shape).astype(np.float32)
    data["wl"] = rng.normal(size=data["initial_state"].shape).astype(np.float32)
    np.savez(out / f"in_{case}.npz", **{k: v for k, v in data.items() if k != "delta_softplus"})
    inputs[case] = data
  tokens = np.random.default_rng(seed).integers(0, MODEL["vocab_size"], (4, 19)).astype(np.int32)
  np.savez(out / "in_model.npz", tokens=tokens)
  rng = np.random.default_rng(seed + 200)
  cplx = lambda shape: (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
  np.savez(out / "in_layers.npz", x=rng.normal(size=(2, 36, 5)).astype(np.float32),
           conv=rng.normal(size=(2, 4, 10)).astype(np.float32),
           ssm_mixer=rng.normal(size=(2, 10, 3)).astype(np.float32), ssm_s4d=cplx((2, 5, 2)))
  proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(__file__))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = dict(np.load(out / "results.npz"))
  info = {name: json.loads((out / f"{name}.json").read_text())
          for name in ("errors",)}
  return inputs, results, info


def _rel(got, want) -> float:
  from oracle import rel_err

  return rel_err(got, want)


def _scan_params():
  return [(case, backend) for case, (_, _, backends, _) in SCAN_CASES.items()
          for backend in backends]


@pytest.mark.parametrize("case,backend", _scan_params())
def test_sequence_parallel_scan_matches_float64_loop(worker, case, backend):
  from oracle import numpy_scan

  inputs, results, _ = worker
  kw = {k: inputs[case][k] for k in SCAN_NAMES}
  y_ref, last_ref = numpy_scan(**kw, delta_softplus=True)
  y = results[f"{case}/{backend}/multi/y"]
  last = results[f"{case}/{backend}/multi/last"]
  assert y.shape == y_ref.shape and last.shape == last_ref.shape
  assert _rel(y, y_ref) < 2e-4
  assert _rel(last, last_ref) < 2e-4


@pytest.mark.parametrize("case,backend", _scan_params())
def test_sequence_parallel_scan_matches_one_device(worker, case, backend):
  _, results, _ = worker
  for what in ("y", "last"):
    multi = results[f"{case}/{backend}/multi/{what}"]
    single = results[f"{case}/{backend}/single/{what}"]
    assert multi.dtype == single.dtype, what
    assert _rel(multi, single) < 1e-5, what


_GRADS64 = {}


def _float64_gradients(case, data):
  """Gradients of the float64 jax loop (an implementation sharing no code with ssmax), per case."""
  if case not in _GRADS64:
    import jax
    import jax.numpy as jnp
    from oracle import jax64_scan

    with jax.enable_x64(True):
      def loss(*args):
        y, last = jax64_scan(**dict(zip(SCAN_NAMES, args)), delta_softplus=True)
        return jnp.sum(y * data["wy"]) + jnp.sum(last * data["wl"])

      args = [jnp.asarray(data[k], jnp.float64) for k in SCAN_NAMES]
      grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
      _GRADS64[case] = [np.asarray(g) for g in grads]
  return _GRADS64[case]


@pytest.mark.parametrize("case,backend", [p for p in _scan_params() if SCAN_CASES[p[0]][3]])
def test_sequence_parallel_gradients_match_one_device(worker, case, backend):
  inputs, results, _ = worker
  for name in SCAN_NAMES:
    multi = results[f"{case}/{backend}/multi/grad_{name}"]
    single = results[f"{case}/{backend}/single/grad_{name}"]
    assert multi.shape == np.shape(inputs[case][name]), name
    assert _rel(multi, single) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_parallel_gradients_match_float64(worker, backend):
  # One case against the float64 oracle (slow to differentiate); the others against one device.
  inputs, results, _ = worker
  grads64 = _float64_gradients("seq4", inputs["seq4"])
  for name, g64 in zip(SCAN_NAMES, grads64):
    assert _rel(results[f"seq4/{backend}/multi/grad_{name}"], g64) < 1e-3, name


def test_data_and_sequence_parallel_training_step_matches_one_device(worker):
  _, results, _ = worker
  multi = {k[len("model/multi/"):]: v for k, v in results.items() if k.startswith("model/multi/")}
  single = {k[len("model/single/"):]: v for k, v in results.items()
            if k.startswith("model/single/")}
  assert multi.keys() == single.keys() and len(multi) > 10
  assert np.isfinite(single["loss"]) and single["loss"] > 1.0  # ~log(40) at init
  for name in multi:
    assert multi[name].shape == single[name].shape, name
    assert _rel(multi[name], single[name]) < 1e-5, name
  # Not trivially equal: the gradients are not all zero.
  assert any(np.max(np.abs(v)) > 0 for k, v in single.items() if k.startswith("grad"))


@pytest.mark.parametrize("layer", ["mixer", "s4d", "s4"])
def test_sequence_parallel_layers_match_one_device(worker, layer):
  # Output and (mixers, S4D) the state after the sequence, from a random state before it.
  _, results, _ = worker
  prefix = f"layer/{layer}/"
  single = {k[len(prefix + "single"):]: v for k, v in results.items()
            if k.startswith(prefix + "single")}
  multi = {k[len(prefix + "multi"):]: v for k, v in results.items()
           if k.startswith(prefix + "multi")}
  assert single.keys() == multi.keys() and single
  for name in single:
    assert multi[name].shape == single[name].shape, name
    assert _rel(multi[name], single[name]) < 1e-5, name


def test_halo_passes_previous_shards_tail(worker):
  _, results, _ = worker
  x = (np.arange(2)[:, None, None] * 100 + np.arange(12)[None, :, None] * 10
       + np.arange(3)[None, None, :]).astype(np.float32)
  # Shard i (steps 3i..3i+2) receives steps 3i-2, 3i-1; shard 0 zeros, or `first` (-1).
  want = np.concatenate([np.zeros((2, 2, 3))] + [x[:, 3 * i - 2:3 * i] for i in (1, 2, 3)], 1)
  np.testing.assert_array_equal(results["halo"], want)
  want[:, :2] = -1.0
  np.testing.assert_array_equal(results["halo_first"], want)
  np.testing.assert_array_equal(results["gathered"], np.stack([x] * 4))  # one copy per shard
  np.testing.assert_array_equal(results["gather_then_piece"], 2 * x)
  np.testing.assert_array_equal(results["last_shard"], x[:, -1])


@pytest.mark.parametrize("name,match", [
    ("length_not_divisible", r"u's length \(axis 1\) must be divisible by the size 4 of mesh axis "
                             r"'seq'; got shape \(2, 35, 5\)"),
    ("batch_not_divisible", r"u's batch \(axis 0\) must be divisible by the size 2 of mesh axis "
                            r"'data'; got shape \(1, 36, 5\)"),
    ("axis_not_in_mesh", r"sequence_axis='time' is not an axis of the mesh"),
    ("same_axis", r"data_axis and sequence_axis must be different mesh axes"),
    ("pallas_sequence_axis", r"Mosaic GPU's CPU interpreter cannot run the kernel on 4 devices "
                             r"of a shard_map at once"),
    ("halo_too_wide", r"x must hold at least width=4 steps per shard"),
    ("shard_batch_not_divisible", r"batch\['tokens'\]'s batch \(axis 0\) must be divisible by "
                                  r"the size 2"),
    ("make_mesh_too_many", r"data \* seq = 8 exceeds the 4 available devices"),
])
def test_multi_device_errors(worker, name, match):
  import re

  errors = worker[2]["errors"]
  assert errors[name] is not None, f"{name} raised no ValueError"
  assert re.search(match, errors[name]), errors[name]


# The benchmark on four CPU devices: tests/benchmarks/test_bench_parallel.py.


# Errors that need no second device: in this process.


def test_sequence_axis_outside_shard_map_is_an_error():
  import ssmax
  from oracle import random_inputs

  kw = random_inputs(0, b=1, l=8, d=5, n=3)
  with pytest.raises(ValueError, match=r"sequence_axis='seq' is not an axis bound here"):
    ssmax.selective_scan(**kw, sequence_axis="seq")


def test_sequence_axis_must_be_a_name():
  import ssmax
  from oracle import random_inputs

  kw = random_inputs(0, b=1, l=8, d=5, n=3)
  with pytest.raises(ValueError, match=r"sequence_axis must be a mesh axis name \(str\) or None; "
                                       r"got 3"):
    ssmax.selective_scan(**kw, sequence_axis=3)


def test_collective_outside_shard_map_is_an_error():
  import jax.numpy as jnp

  from ssmax import parallel

  with pytest.raises(ValueError, match=r"axis_name='seq' is not bound here"):
    parallel.sequence_halo(jnp.zeros((1, 8, 3)), 2, "seq")


def test_mesh_argument_must_be_a_mesh():
  from ssmax import parallel
  from oracle import random_inputs

  kw = random_inputs(0, b=1, l=8, d=5, n=3)
  with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh; got str"):
    parallel.selective_scan("mesh", **kw)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(sys.argv[2])
  else:
    sys.exit(f"usage: {sys.argv[0]} --worker DIR (run the tests with pytest)")


def test_fused_kernel_inside_shard_map_on_one_device(seed):
  """The Mosaic GPU kernel inside shard_map (Mosaic GPU's interpreter, a 1 x 1 mesh), with packed
  documents and sequence segments in both directions: ``parallel.selective_scan`` equals the
  kernel outside the map, and under a shard_map of the user's the gradients do too (a replicated
  A's included; the sequence-parallel path rematerialises, which the interpreter's callbacks
  cannot be differentiated through). Several CPU devices at once are refused
  (test_multi_device_errors): the interpreter's simulated memory is not shared between them."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import ssmax
  from oracle import random_inputs
  from ssmax import parallel
  from ssmax.pallas import selective_scan_mosaic as mosaic

  kw = random_inputs(seed, b=2, l=70, d=5, n=3)
  seg = np.zeros((2, 70), np.int32)
  seg[0, 33:] = 1
  mesh = parallel.make_mesh(data=1, seq=1)
  names = ("u", "delta", "A", "B")
  args = [jnp.asarray(kw[k]) for k in names]
  config = mosaic.Config(segments=2, bwd_segments=2)

  def loss(*a):
    y, last = ssmax.selective_scan(**dict(kw, **dict(zip(names, a))), return_last_state=True,
                                   backend="pallas", segment_ids=seg)
    return jnp.sum(y * y) + jnp.sum(last), (y, last)

  spec = lambda x: P("data") if x.ndim == 3 else P()
  mapped = jax.shard_map(lambda *a: jax.lax.psum(loss(*a)[0], "data"), mesh=mesh,
                         in_specs=tuple(spec(a) for a in args), out_specs=P())
  sharded_args = [jax.device_put(a, NamedSharding(mesh, spec(a))) for a in args]
  with pytest.MonkeyPatch.context() as mp:  # sequence segments: their combine runs in the map too
    mp.setattr(mosaic, "Config", lambda: config)
    y1, l1 = parallel.selective_scan(mesh, **kw, return_last_state=True, backend="pallas",
                                     segment_ids=seg)
    g1 = jax.jit(jax.grad(mapped, argnums=(0, 1, 2, 3)))(*sharded_args)
    g2, (y2, l2) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  assert _rel(y1, y2) < 1e-6 and _rel(l1, l2) < 1e-6
  for name, a, b in zip(names, g1, g2):
    assert _rel(a, b) < 1e-6, name
