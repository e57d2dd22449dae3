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

Several processes (hosts). The same script runs in every process of a multi-process run (one per
host, or one per GPU); JAX's arrays are then global: each process holds the shards on its own
devices and every process runs the same computation. :func:`initialize_distributed` joins the
processes (a no-op in a single process); :func:`make_mesh` spans every process's devices; each
process places only its own rows of the batch with :func:`shard_local_batch` (which rows:
:func:`process_rows`), or the whole global batch, the same on every process, with
:func:`shard_batch`; parameters go through :func:`replicate`, the same on every process. The
example above then reads, with ``read_tokens(rows)`` this process's rows of the data,
``(rows.stop - rows.start, length + 1)``::

  parallel.initialize_distributed()  # first, before anything touches JAX's devices
  mesh = parallel.make_mesh(data=2, seq=2)  # over the devices of every process
  rows = parallel.process_rows(mesh, global_batch)  # this process's slice of the batch axis
  local = read_tokens(rows)
  tokens, targets = parallel.shard_local_batch(mesh, (local[:, :-1], local[:, 1:]))
  params = parallel.replicate(mesh, params)  # global (global_batch, length) batch, as above
  loss, grads = parallel.value_and_grad(local_loss, mesh)(params, tokens, targets)
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
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
  """Places a pytree of global ``(batch, length, ...)`` (or ``(batch,)``) arrays on ``mesh``.

  Every array is the whole batch. In a multi-process run every process must pass the same batch
  (each keeps the shards of its own devices): this is checked with a hash of the batch gathered
  from every process, so every process must call it. To place only each process's own rows, use
  :func:`shard_local_batch`.

  Args:
    mesh: the mesh.
    batch: pytree of arrays; axis 0 is split over ``data_axis``, axis 1 over ``sequence_axis``.
    data_axis, sequence_axis: mesh axis names, or None to replicate along that array axis.

  Returns:
    The same pytree of ``jax.Array`` with ``NamedSharding(mesh, batch_spec(...))``.

  Raises:
    ValueError: when an axis is not in the mesh or an array's batch (length) is not divisible by
      the size of the data (sequence) axis; in a multi-process run, when the batch is not the same
      on every process.
  """
  _check_axes(mesh, data_axis=data_axis, sequence_axis=sequence_axis)
  several = jax.process_count() > 1
  if several:
    _check_same_on_every_process(batch)

  def place(path, x):
    name = "batch" + jax.tree_util.keystr(path)
    sharding.min_rank(name, x, 1, "(batch, ...)")
    _check_divisible(mesh, name, x, data_axis, sequence_axis)
    target = NamedSharding(mesh, batch_spec(np.ndim(x), data_axis, sequence_axis))
    if several and not _is_global(x):
      # The hash above showed the data equal everywhere: each device takes its slice of it,
      # without the gather of the whole array with which device_put would check that again.
      return jax.make_array_from_process_local_data(target, np.asarray(x), np.shape(x))
    return jax.device_put(x, target)

  return jax.tree_util.tree_map_with_path(place, batch)


def process_rows(mesh: Mesh, batch_size: int, *, data_axis: str | None = DATA_AXIS) -> slice:
  """The rows of a global batch of ``batch_size`` rows that this process holds on ``mesh``.

  The batch axis is split into ``mesh.shape[data_axis]`` equal blocks, one per index along the
  data axis; this process's rows are the blocks its devices hold. With :func:`make_mesh` over
  ``jax.devices()`` (ordered by process) and ``P`` processes, process ``p`` holds rows
  ``p * batch_size // P`` up to ``(p + 1) * batch_size // P`` when ``P`` divides the size of the
  data axis, and every row when the data axis lies within one process (``data_axis=None``, or
  each process's devices only along the sequence axis). In a single process: every row.

  Args:
    mesh: the mesh.
    batch_size: rows of the global batch; a multiple of the size of ``data_axis``.
    data_axis: mesh axis the batch is split over, or None (every process holds every row).

  Returns:
    ``slice(start, stop)`` of the global batch axis: what this process passes to
    :func:`shard_local_batch`.

  Raises:
    ValueError: when the axis is not in the mesh, ``batch_size`` is not a positive multiple of
      its size, this process holds no device of the mesh, or its blocks are not contiguous (a mesh
      whose devices are not grouped by process along the data axis).
  """
  _checks.positive_int("batch_size", batch_size)
  _check_axes(mesh, data_axis=data_axis)
  if data_axis is None:
    return slice(0, batch_size)
  n = mesh.shape[data_axis]
  if batch_size % n:
    raise ValueError(f"batch_size must be divisible by the size {n} of mesh axis {data_axis!r}; "
                     f"got {batch_size}")
  blocks = _process_blocks(mesh, data_axis)
  if blocks != list(range(blocks[0], blocks[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds the blocks {blocks} of mesh axis "
                     f"{data_axis!r}, not contiguous rows; order the mesh's devices by process "
                     "(as make_mesh does)")
  per = batch_size // n
  return slice(blocks[0] * per, (blocks[-1] + 1) * per)


def shard_local_batch(mesh: Mesh, local_batch, *, data_axis: str | None = DATA_AXIS,
                      sequence_axis: str | None = SEQUENCE_AXIS):
  """Places each process's rows of a batch on ``mesh`` as one global batch.

  Each process passes only its rows (:func:`process_rows`) at full length: arrays of shape
  ``(local_batch, length, ...)`` (or ``(local_batch,)``), with ``local_batch`` = global batch
  times the fraction of the data axis's blocks that this process holds. The result is the global
  ``(batch, length, ...)`` array sharded as by :func:`shard_batch`, built with
  ``jax.make_array_from_process_local_data``; nothing crosses processes, so unlike
  :func:`shard_batch` it is not a collective. In a single process it equals :func:`shard_batch`.
  Every process must pass arrays of the same shapes and dtypes.

  Args:
    mesh: the mesh.
    local_batch: pytree of this process's rows; axis 0 is split over ``data_axis``, axis 1 (the
      whole length) over ``sequence_axis``.
    data_axis, sequence_axis: mesh axis names, or None to replicate along that array axis (with
      ``data_axis=None`` every process passes the whole batch).

  Returns:
    The pytree of global ``jax.Array`` ``(batch, length, ...)`` with
    ``NamedSharding(mesh, batch_spec(...))``.

  Raises:
    ValueError: when an axis is not in the mesh, an array's rows are not divisible by the number
      of data-axis blocks this process holds, or its length by the size of the sequence axis.
  """
  _check_axes(mesh, data_axis=data_axis, sequence_axis=sequence_axis)
  blocks = 1 if data_axis is None else len(_process_blocks(mesh, data_axis))
  n = 1 if data_axis is None else mesh.shape[data_axis]

  def place(path, x):
    name = "local_batch" + jax.tree_util.keystr(path)
    sharding.min_rank(name, x, 1, "(batch, ...)")
    shape = _checks.shape_of(x)
    if shape[0] % blocks:
      raise ValueError(f"{name}'s rows (axis 0) must be divisible by the {blocks} blocks of mesh "
                       f"axis {data_axis!r} on this process's devices; got shape {shape}")
    _check_divisible(mesh, name, x, None, sequence_axis)
    global_shape = (shape[0] // blocks * n, *shape[1:])
    target = NamedSharding(mesh, batch_spec(len(shape), data_axis, sequence_axis))
    return jax.make_array_from_process_local_data(target, x, global_shape)

  return jax.tree_util.tree_map_with_path(place, local_batch)


def replicate(mesh: Mesh, tree):
  """Places every array of ``tree`` (parameters, optimizer state) on all devices of ``mesh``.

  In a multi-process run every process must pass the same values (e.g. parameters initialized
  from the same seed); ``jax.device_put`` checks that, gathering each array from every process,
  so every process must call it. PRNG key arrays are placed through their data (JAX 0.11.2
  refuses a key array for devices of other processes).
  """
  target = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), target),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(x, target)

  return jax.tree.map(put, tree)


def initialize_distributed(**kwargs) -> bool:
  """Joins the other processes of a multi-process run (``jax.distributed.initialize``); a no-op
  when this process runs alone.

  Call it first, before anything touches JAX's devices (``jax.distributed.initialize`` must come
  before the backend starts). It initializes when this process is one of several:

  * ``JAX_NUM_PROCESSES`` (or ``num_processes=``) is more than 1; the process index comes from
    ``JAX_PROCESS_ID`` (or ``process_id=``), and JAX itself reads the coordinator's
    ``host:port`` from ``JAX_COORDINATOR_ADDRESS``;
  * ``JAX_COORDINATOR_ADDRESS`` (or ``coordinator_address=``) is set without a process count,
    or ``cluster_detection_method=`` is given: JAX finds the rest;
  * one of the cluster environments that ``jax.distributed.initialize`` detects by itself
    (Slurm, Open MPI, Cloud TPU, Kubernetes with the ``kubernetes`` package) is present and
    counts more than one process: JAX takes every setting from it.

  Args:
    **kwargs: passed on to ``jax.distributed.initialize`` (``coordinator_address``,
      ``num_processes``, ``process_id``, ``local_device_ids``, ``initialization_timeout``, ...);
      they take precedence over the environment.

  Returns:
    True when this process is part of a multi-process run (initialized now, or before this
    call); False when it runs alone and nothing was done.

  Raises:
    RuntimeError: from JAX, when a multi-process run is asked for after JAX's backend started.
    ValueError: from JAX, when the settings are incomplete.
  """
  if jax.distributed.is_initialized():
    return True
  count = kwargs.get("num_processes", os.environ.get("JAX_NUM_PROCESSES"))
  if count is not None:
    if int(count) <= 1:
      return False
    kwargs["num_processes"] = int(count)
    if "process_id" not in kwargs and os.environ.get("JAX_PROCESS_ID") is not None:
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  elif not (kwargs.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
            or kwargs.get("cluster_detection_method") not in (None, "deactivate")
            or _cluster_process_count() > 1):
    return False
  jax.distributed.initialize(**kwargs)
  return True


def _cluster_process_count() -> int:
  """Processes of the cluster environment ``jax.distributed.initialize`` would detect (the first
  present of JAX's own detectors that need no opt-in, as JAX picks it); 1 when there is none."""
  from jax._src import clusters  # JAX's detectors; there is no public API for the detection alone
  for env in clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      return env.get_process_count()
  return 1


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


def _is_global(x) -> bool:
  """A ``jax.Array`` with shards on other processes' devices (placed already)."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _process_blocks(mesh: Mesh, axis: str) -> list[int]:
  """The indices along ``axis`` of ``mesh`` that this process's devices hold, sorted."""
  me, dim = jax.process_index(), mesh.axis_names.index(axis)
  blocks = sorted({index[dim] for index, device in np.ndenumerate(mesh.devices)
                   if device.process_index == me})
  if not blocks:
    raise ValueError(f"process {me} holds no device of the mesh {dict(mesh.shape)}")
  return blocks


def _check_same_on_every_process(batch) -> None:
  """Raises ValueError unless the host arrays of ``batch`` hash the same on every process (one
  gather of 16 bytes, not of the data)."""
  digest = hashlib.blake2b(str(jax.tree.structure(batch)).encode(), digest_size=16)
  for x in jax.tree.leaves(batch):
    if not _is_global(x):
      x = np.ascontiguousarray(x)
      digest.update(f"{x.shape}{x.dtype.str}".encode())
      digest.update(x.view(np.uint8).reshape(-1) if x.size else b"")
  mine = np.frombuffer(digest.digest(), np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine))
  if not (every == mine).all():
    differ = [p for p in range(len(every)) if not (every[p] == every[0]).all()]
    raise ValueError(
        f"shard_batch takes the global batch, the same on every process, but the batch of "
        f"process(es) {differ} differs from process 0's (of {jax.process_count()} processes); to "
        "place each process's own rows, use shard_local_batch (process_rows gives its rows)")


def _place(mesh: Mesh, x, spec: P):
  """Reshards to ``spec`` on meshes with Explicit axes (whose shard_map will not); on Auto axes
  ``shard_map`` moves the data itself."""
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return x
