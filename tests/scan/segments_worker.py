"""The 4-device part of test_segments.py, run as ``python segments_worker.py DIR`` in a subprocess
(the fake devices must be set before jax is imported). Reads DIR/in.npz, writes DIR/results.npz
and DIR/errors.json; the tests compare them with float64 references."""

import json
import os
import sys

DEVICES = 4
SCAN_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def main(out_dir: str) -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={DEVICES}")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  import ssmax
  from ssmax import nn as snn
  from ssmax import parallel
  from ssmax.nn.s4 import S4DLayer, S4Layer

  assert jax.device_count() == DEVICES, jax.devices()
  data = np.load(os.path.join(out_dir, "in.npz"))
  seg = jnp.asarray(data["segment_ids"])
  args = [jnp.asarray(data[k]) for k in SCAN_NAMES]
  mesh = parallel.make_mesh(1, DEVICES)
  results, errors = {}, {}
  for backend in ("sequential", "associative"):
    named = lambda a, backend=backend: dict(zip(SCAN_NAMES, a), delta_softplus=True,
                                            return_last_state=True, backend=backend)
    multi = lambda *a, named=named: parallel.selective_scan(mesh, **named(a), segment_ids=seg)
    single = lambda *a, named=named: ssmax.selective_scan(**named(a), segment_ids=seg)
    for tag, fn in (("multi", multi), ("single", single)):
      def loss(*a, fn=fn):
        y, last = fn(*a)
        return jnp.sum(y * data["wy"]) + jnp.sum(last * data["wl"]), (y, last)

      (_, (y, last)), grads = jax.jit(jax.value_and_grad(
          loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
      results[f"{backend}/{tag}/y"] = y
      results[f"{backend}/{tag}/last"] = last
      for name, g in zip(SCAN_NAMES, grads):
        results[f"{backend}/{tag}/grad_{name}"] = g

  # A mixer (conv halo across shard edges, masked by segment) from a carried state.
  seq = P(None, "seq")
  build = lambda axis: snn.MambaMixer(snn.MambaConfig(
      d_model=5, n_layer=1, d_state=3, d_conv=4, expand=2, sequence_axis=axis,
      scan_backend="sequential"), rngs=nnx.Rngs(1))
  x = jnp.asarray(data["x"])
  state = build(None).init_state(x.shape[0])
  state = snn.MixerState(state.conv + 0.5, state.ssm + 0.25)
  call = lambda m, x, state, seg: m(x, state, return_state=True, segment_ids=seg)
  graphdef, params = nnx.split(build(None))
  single = jax.jit(lambda p, *a: call(nnx.merge(graphdef, p), *a))(params, x, state, seg)
  graphdef, params = nnx.split(build("seq"))
  multi = jax.jit(jax.shard_map(lambda p, *a: call(nnx.merge(graphdef, p), *a), mesh=mesh,
                                in_specs=(P(), seq, P(), seq), out_specs=(seq, P())))(
                                    params, x, state, seg)
  for tag, result in (("single", single), ("multi", multi)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(result):
      results[f"mixer/{tag}{jax.tree_util.keystr(path)}"] = leaf

  # S4D (state passed, cut at boundaries) and S4 (whole sequence gathered), packed.
  x5 = jnp.asarray(data["x"])
  layers = {
      "s4d": (lambda axis: S4DLayer(5, d_state=4, init="lin", sequence_axis=axis,
                                    rngs=nnx.Rngs(2)),
              lambda m, x, seg: m(x, jnp.full((3, 5, 2), 0.5 + 0.25j, jnp.complex64),
                                  return_state=True, segment_ids=seg), (seq, P())),
      "s4": (lambda axis: S4Layer(5, d_state=4, sequence_axis=axis, rngs=nnx.Rngs(2)),
             lambda m, x, seg: m(x, segment_ids=seg), seq),
  }
  for name, (build_layer, call_layer, out_specs) in layers.items():
    graphdef, params = nnx.split(build_layer(None))
    single = jax.jit(lambda p, *a: call_layer(nnx.merge(graphdef, p), *a))(params, x5, seg)
    graphdef, params = nnx.split(build_layer("seq"))
    multi = jax.jit(jax.shard_map(lambda p, *a: call_layer(nnx.merge(graphdef, p), *a),
                                  mesh=mesh, in_specs=(P(), seq, seq), out_specs=out_specs))(
                                      params, x5, seg)
    for tag, result in (("single", single), ("multi", multi)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(result):
        results[f"{name}/{tag}{jax.tree_util.keystr(path)}"] = leaf

  try:
    named = dict(zip(SCAN_NAMES, args), delta_softplus=True)
    cut = {k: (v[:, :35] if k in ("u", "delta", "z", "B", "C") else v) for k, v in named.items()}
    parallel.selective_scan(mesh, **cut, segment_ids=seg[:, :35])
    errors["not_divisible"] = None
  except ValueError as e:
    errors["not_divisible"] = str(e)

  np.savez(os.path.join(out_dir, "results.npz"), **{k: np.asarray(v) for k, v in results.items()})
  with open(os.path.join(out_dir, "errors.json"), "w") as f:
    json.dump(errors, f)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(f"usage: {sys.argv[0]} DIR (run the tests with pytest tests/scan/test_segments.py)")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(sys.argv[1])
