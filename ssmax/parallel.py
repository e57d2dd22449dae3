"""Running ssmax on many devices: a (data, seq) mesh, sharded batches, sequence parallelism.

Everything builds on JAX's own SPMD machinery. A :class:`jax.sharding.Mesh` has two axes:

* ``"data"``: the batch is split across it; parameters are replicated.
* ``"seq"``: each sequence is split into contiguous pieces of its length across it. Layers that
  mix along the length pass what crosses a boundary between neighbouring shards: the selective
  scan its state (:func:`ssmax.selective_scan` with ``sequence_axis``), the causal convolution its
  last ``d_conv - 1`` inputs (:func:`sequence_halo`).

Code that runs per shard goes under ``jax.shard_map``; inside it the collectives below take the
axis name. Outside it, :func:`selective_scan` and :func:`value_and_grad` take a mesh and global
arrays and apply ``shard_map`` with the specs this module uses: ``P(data, seq)`` for the leading
``(batch, length)`` axes of the batch, ``P()`` (replicated) for parameters.

Example, a data- and sequence-parallel training step of a :class:`ssmax.nn.MambaLM` built with
``MambaConfig(..., sequence_axis="seq")``::

  mesh = parallel.make_mesh(data=2, seq=2)
  graphdef, params = nnx.split(model)
  params = parallel.replicate(mesh, params)

  def local_loss(params, tokens, targets):  # this shard's piece, summed; divide by the global count
    logits = nnx.merge(graphdef, params)(tokens)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll.sum() / n_tokens

  loss, grads = parallel.value_and_grad(local_loss, mesh)(params, tokens, targets)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssmax import _checks, sharding
from ssmax import scan as ssmax_scan
# The collectives are public here too, beside the meshes they run on.
from ssmax.sharding import (gather_sequence, last_shard, local_piece, pass_state,  # noqa: F401
                            sequence_halo)

DATA_AXIS = "data"
SEQUENCE_AXIS = "seq"


# ----------------------------------------------------------------------------------------------
# Meshes and placement.


def make_mesh(data: int | None = None, seq: int = 1, *, devices=None) -> Mesh:
  """A ``("data", "seq")`` mesh of ``data * seq`` devices.

  The axes are of type ``Auto``: code outside ``shard_map`` (embedding, loss, optimizer) needs no
  sharding annotations, XLA partitions it from the placement of its inputs.

  Args:
    data: size of the data axis; default ``len(devices) // seq``.
    seq: size of the sequence axis.
    devices: the devices to use, default ``jax.devices()``.

  Returns:
    A :class:`jax.sharding.Mesh` with axis names ``("data", "seq")``.

  Raises:
    ValueError: when ``data * seq`` is not the number of devices given (or, with ``devices`` left
      out, more than ``jax.device_count()``).
  """
  seq = _checks.positive_int("seq", seq)
  all_devices = list(jax.devices() if devices is None else devices)
  if data is None:
    data = max(len(all_devices) // seq, 1)
  data = _checks.positive_int("data", data)
  need = data * seq
  if devices is not None and need != len(all_devices):
    raise ValueError(f"data * seq must equal the {len(all_devices)} devices given; got "
                     f"data={data}, seq={seq}")
  if need > len(all_devices):
    raise ValueError(f"data * seq = {need} exceeds the {len(all_devices)} available devices; got "
                     f"data={data}, seq={seq}")
  grid = np.asarray(all_devices[:need], dtype=object).reshape(data, seq)
  return Mesh(grid, (DATA_AXIS, SEQUENCE_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_spec(ndim: int, data_axis: str | None = DATA_AXIS,
               sequence_axis: str | None = SEQUENCE_AXIS) -> P:
  """``PartitionSpec`` of a batch array: axis 0 on ``data_axis``, axis 1 (length) on
  ``sequence_axis``, the rest replicated. ``ndim`` 1 arrays are ``(batch,)``."""
  _checks.positive_int("ndim", ndim)
  return P(data_axis) if ndim == 1 else P(data_axis, sequence_axis)


def shard_batch(mesh: Mesh, batch, *, data_axis: str | None = DATA_AXIS,
                sequence_axis: str | None = SEQUENCE_AXIS):
  """Places a pytree of ``(batch, length, ...)`` (or ``(batch,)``) arrays on ``mesh``.

  Args:
    mesh: the mesh.
    batch: pytree of arrays; axis 0 is split over ``data_axis``, axis 1 over ``sequence_axis``.
    data_axis, sequence_axis: mesh axis names, or None to replicate along that array axis.

  Returns:
    The same pytree of ``jax.Array`` with ``NamedSharding(mesh, batch_spec(...))``.

  Raises:
    ValueError: when an axis is not in the mesh or an array's batch (length) is not divisible by
      the size of the data (sequence) axis.
  """
  _check_axes(mesh, data_axis=data_axis, sequence_axis=sequence_axis)

  def place(path, x):
    name = "batch" + jax.tree_util.keystr(path)
    sharding.min_rank(name, x, 1, "(batch, ...)")
    _check_divisible(mesh, name, x, data_axis, sequence_axis)
    return jax.device_put(x, NamedSharding(mesh, batch_spec(np.ndim(x), data_axis, sequence_axis)))

  return jax.tree_util.tree_map_with_path(place, batch)


def replicate(mesh: Mesh, tree):
  """Places every array of ``tree`` (parameters, optimizer state) on all devices of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------
# Global-array entry points: shard_map with this module's specs.


def selective_scan(mesh: Mesh, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, initial_state=None, return_last_state=False,
                   backend="auto", *, data_axis: str | None = DATA_AXIS,
                   sequence_axis: str | None = SEQUENCE_AXIS, segment_ids=None):
  """:func:`ssmax.selective_scan` on global arrays, batch over ``data_axis`` and length over
  ``sequence_axis`` of ``mesh``.

  Arguments, shapes and result are those of :func:`ssmax.selective_scan` (global shapes:
  ``u`` ``(batch, length, channels)``, ``B`` and ``C`` ``(batch, length[, groups], state)``,
  ``A`` ``(channels, state)``, ``initial_state`` ``(batch, channels, state)``). ``A``, ``D`` and
  ``delta_bias`` are replicated. Works under ``jax.jit`` and ``jax.grad``.

  Args:
    mesh: a :class:`jax.sharding.Mesh`, e.g. from :func:`make_mesh`.
    data_axis: mesh axis for the batch, or None to replicate the batch.
    sequence_axis: mesh axis for the length, or None for no sequence parallelism.
    segment_ids: optional ``(batch, length)`` integer ids of packed documents, sharded like
      ``u``'s first two axes; the semantics of :func:`ssmax.selective_scan` (the state resets
      where the id changes, across shard edges too).

  Returns:
    ``y`` ``(batch, length, channels)`` in ``u.dtype`` sharded like ``u``, or ``(y, last_state)``.

  Raises:
    ValueError: on the checks of :func:`ssmax.selective_scan`; on an axis that is not in the
      mesh, or the same axis for both; on a batch (length) not divisible by the data (sequence)
      axis size.
  """
  ssmax_scan.dispatch.parse(backend)
  ssmax_scan.check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                          segment_ids)
  _check_axes(mesh, data_axis=data_axis, sequence_axis=sequence_axis)
  for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z),
                  ("segment_ids", segment_ids)):
    if x is not None:
      _check_divisible(mesh, name, x, data_axis, sequence_axis)
  if initial_state is not None:
    _check_divisible(mesh, "initial_state", initial_state, data_axis, None)

  seq_spec = lambda x: P() if x is None else batch_spec(np.ndim(x), data_axis, sequence_axis)
  in_specs = (seq_spec(u), seq_spec(delta), P(), seq_spec(B), seq_spec(C), P(), seq_spec(z), P(),
              P(data_axis), seq_spec(segment_ids))
  out_specs = (P(data_axis, sequence_axis), P(data_axis)) if return_last_state else (
      P(data_axis, sequence_axis))

  def local(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids):
    return ssmax_scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     initial_state, return_last_state, backend,
                                     sequence_axis=sequence_axis, segment_ids=segment_ids)

  if sequence_axis is None:
    # Keep only the inputs for the backward pass, as the sequence-parallel mode does: residuals
    # crossing shard_map include zero-size arrays of lax.associative_scan, on which XLA's Shardy
    # partitioner (jax 0.11.2) crashes.
    local = jax.checkpoint(local)
  args = (u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
  args = tuple(None if a is None else _place(mesh, jnp.asarray(a), s)
               for a, s in zip(args, in_specs))
  # Always under jit: eager (op-by-op) differentiation of this shard_map crashes the process with
  # a segmentation fault on CPU meshes (jax 0.11.2); under an outer jit this jit is inlined.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(*args)


def value_and_grad(local_loss: Callable, mesh: Mesh, *, data_axis: str | None = DATA_AXIS,
                   sequence_axis: str | None = SEQUENCE_AXIS) -> Callable:
  """Loss and gradient of a loss summed over a batch sharded on ``(data, seq)``.

  ``local_loss(params, *batch)`` sees this device's piece of every batch array (``(batch, length,
  ...)`` arrays split on both axes, ``(batch,)`` arrays on the data axis) and the whole
  ``params``, and returns a float scalar: the loss of its piece, summed (for a mean, divide by the
  global count inside). Models called inside must thread ``sequence_axis`` themselves (e.g.
  ``MambaConfig(sequence_axis="seq")``) when it is not None.

  The gradient is taken inside ``shard_map``, so only the parameters' gradients cross devices
  (one all-reduce, which ``shard_map`` inserts for the replicated ``params``).

  Args:
    local_loss: ``(params, *batch) -> scalar``, as above.
    mesh: the mesh.
    data_axis, sequence_axis: mesh axis names (None: that array axis is not split).

  Returns:
    ``f(params, *batch) -> (loss, grads)``: the loss summed over all shards and its gradient
    with respect to ``params``, both replicated.

  Raises:
    ValueError: (when ``f`` is called) on an axis not in the mesh or a batch array whose batch
      or length is not divisible by the axis size.
  """
  _check_axes(mesh, data_axis=data_axis, sequence_axis=sequence_axis)
  axes = tuple(a for a in (data_axis, sequence_axis) if a is not None)

  def local(params, *batch):
    loss, grads = jax.value_and_grad(local_loss)(params, *batch)
    return lax.psum(loss, axes), grads

  def f(params, *batch):
    specs = []
    for i, x in enumerate(batch):
      sharding.min_rank(f"batch[{i}]", x, 1, "(batch, ...)")
      _check_divisible(mesh, f"batch[{i}]", x, data_axis, sequence_axis)
      specs.append(batch_spec(np.ndim(x), data_axis, sequence_axis))
    params = jax.tree.map(lambda a: _place(mesh, a, P()), params)
    batch = tuple(_place(mesh, x, s) for x, s in zip(batch, specs))
    # Under jit, as in selective_scan: eager shard_map with differentiation inside can crash.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), *specs),
                                 out_specs=(P(), P())))(params, *batch)

  return f


# ----------------------------------------------------------------------------------------------
# Checks.


def _check_axes(mesh: Mesh, **axes) -> None:
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
  named = {k: v for k, v in axes.items() if v is not None}
  for arg, axis in named.items():
    if axis not in mesh.axis_names:
      raise ValueError(f"{arg}={axis!r} is not an axis of the mesh, whose axes are "
                       f"{tuple(mesh.axis_names)}")
  if len(set(named.values())) < len(named):
    raise ValueError(f"data_axis and sequence_axis must be different mesh axes; got {named}")


def _check_divisible(mesh: Mesh, name: str, x, data_axis, sequence_axis) -> None:
  shape = _checks.shape_of(x)
  for dim, axis, what in ((0, data_axis, "batch"), (1, sequence_axis, "length")):
    if axis is None or len(shape) <= dim:
      continue
    n = mesh.shape[axis]
    if shape[dim] % n:
      raise ValueError(f"{name}'s {what} (axis {dim}) must be divisible by the size {n} of mesh "
                       f"axis {axis!r}; got shape {shape}")


def _place(mesh: Mesh, x, spec: P):
  """Reshards to ``spec`` on meshes with Explicit axes (whose shard_map will not); on Auto axes
  ``shard_map`` moves the data itself."""
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return x
