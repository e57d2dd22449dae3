"""One training loop for the synthetic tasks: Adam (constant or cosine learning rate), data parallel, resumable.

:func:`train` builds a model, replicates its parameters over a ``jax.sharding.Mesh`` of every
visible device (one ``"data"`` axis), shards each batch along it, and takes Adam steps on the
masked cross-entropy (:func:`optax.adam`): each call of the compiled step draws the step's batch
from ``fold_in(data_key, step)`` on the device and updates the donated model and optimizer state
(with ``steps_per_call > 1``, that many steps in a loop on the device). The data stream is a
function of the seed and the step alone.
Every ``checkpoint_every`` steps Orbax saves the parameters, the optimizer state, the step and the
data key; ``resume=True`` restores the latest checkpoint and continues bit-identically (the
metrics file is cut back to the restored step; see "Resume semantics" below). Progress goes to a tqdm bar and to
``metrics.jsonl``: ``{"kind": "train", "step", "loss", "accuracy", "grad_norm_max", "time_s"}``
(and ``"lr"`` with a schedule) averaged (``grad_norm_max``: the largest gradient norm) over the
last ``log_every`` steps and ``{"kind": "eval", "step", "loss", "accuracy"}`` on a fixed
validation set.

:func:`evaluate` scores a model on a task and can walk long sequences in chunks, carrying the
recurrent state (Mamba) or the KV cache (Transformer) from one chunk to the next, so that memory
stays bounded by the chunk length; it raises on non-finite logits instead of reporting NaN.

Several processes (hosts): launched as one of several processes (see
:func:`ssmax.parallel.initialize_distributed`), :func:`train` joins the others at start-up and
runs the same loop in every process over the devices of all of them; the batch is drawn inside
the compiled step from a key every process holds, so no process reads data for another. Only
process 0 writes ``metrics.jsonl`` and shows the progress bar; every process takes part in the
checkpoints (Orbax coordinates their writes), so ``run_dir`` must be on a file system all
processes share.

Resume semantics. A run directory holds ``metrics.jsonl`` and, with ``checkpoint_every > 0``,
``checkpoints/<step>/`` (the newest two). :func:`train` never silently overwrites a run:

* Without ``resume``, a directory that already holds a run (checkpoints, or a non-empty
  ``metrics.jsonl``) is refused with a ``ValueError``: resume it or choose another directory.
* With ``resume`` and no checkpoint:

  - an empty or new directory starts from step 0 (there is nothing to resume);
  - a directory whose ``metrics.jsonl`` has records but which has no finished checkpoint (the run
    had ``checkpoint_every=0``, or was killed before its first save finished, which leaves only
    an interrupted ``*.orbax-checkpoint-tmp*`` folder) is refused with a ``ValueError`` naming
    the directory, the last recorded step and any interrupted save: it cannot be continued, and
    restarting it would overwrite its records.

* With ``resume`` and checkpoints, the latest checkpoint that reads back is restored (model,
  optimizer, data key) and training continues from its step to ``steps``, bit-identically to a
  run that was never stopped; records after that step are dropped from ``metrics.jsonl`` (they
  are redone), and the final evaluation is redone. A finished run resumed only redoes that
  evaluation.
* A checkpoint ahead of ``steps`` (``--resume --steps=40`` with the latest checkpoint at step 50)
  is refused with a ``ValueError`` before anything is touched: the run is already past ``steps``,
  and cutting it back would lose records; pass ``steps`` >= the checkpoint's step.
* A latest checkpoint that does not read back (data files deleted, truncated or altered, the
  step folder emptied) is moved aside to ``<run_dir>/corrupt_checkpoint_<step>`` with a
  ``RuntimeWarning`` that names the run and the step, and the previous checkpoint is restored
  instead (training redoes the steps in between). When none reads back, a ``ValueError`` names
  the run and each step with its error. Interrupted saves are ignored with a warning.
* Early stopping (``stop_after_perfect_evals=K``): training stops after the ``K``-th "eval" record
  in a row with accuracy exactly 1.0, and that step is checkpointed (whenever the run has a
  checkpoint manager: ``checkpoint_every`` or ``max_seconds`` set). Resumed, such a run restores
  that checkpoint, finds the ``K`` perfect evaluations in its records and stops again without a
  step or an evaluation; resumed with a larger ``K``, it continues from there as a run with that
  ``K`` would have. The last eval record stands for the final evaluation (none is added).
* Time budget (``max_seconds``): past it, training stops at the end of the current ``log_every``
  window, checkpoints that step and returns ``complete=False`` without a final evaluation;
  ``resume`` continues from there bit-identically, like any resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from experiments import models
from experiments.tasks import Batch, PackedBatch
from ssmax import _checks, parallel
from ssmax.io import checkpoint as ssmax_checkpoint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What :func:`train` does.

  Attributes:
    steps: total optimizer steps (a resumed run continues up to this count).
    batch_size: global batch, a multiple of the number of devices.
    learning_rate: Adam learning rate (the peak, with a schedule).
    lr_schedule: ``"constant"``, or ``"cosine"``: decay to 0 at step ``steps`` along half a cosine
      (:func:`optax.cosine_decay_schedule`). Either follows the warm-up.
    warmup_steps: steps of linear warm-up from 0 to ``learning_rate`` (0: none).
    decay_steps: with ``"cosine"``, the cosine covers only the last ``decay_steps`` steps, the rate
      staying at ``learning_rate`` until then (0: every step after the warm-up).
    grad_clip: clip the gradient to this global norm before Adam
      (:func:`optax.clip_by_global_norm`; 0: no clipping, plain :func:`optax.adam`).
    seed: seeds the parameters (``nnx.Rngs(seed)``) and the data stream.
    log_every: steps averaged into one ``"train"`` record.
    eval_every: steps between ``"eval"`` records (0: only after the last step).
    eval_examples: size of the fixed validation set.
    checkpoint_every: steps between checkpoints (0: none); a multiple of ``log_every``.
    resume: continue the run in the run directory from its latest good checkpoint (see
      "Resume semantics" in the module docstring).
    progress: show the tqdm bar.
    stop_after_perfect_evals: ``K > 0`` stops training once ``K`` consecutive ``"eval"`` records
      have accuracy exactly 1.0 (0: never stop early). Needs ``eval_every`` a positive multiple of
      ``log_every``, so that the stop falls on a logged (and checkpointable) step.
    steps_per_call: steps taken by one compiled call (a loop on the device when > 1, saving the
      host's dispatch per step; on the CPU such a loop ran at half the speed of single steps, so
      the default is 1). Must divide ``log_every`` and ``eval_every``.
    max_seconds: wall-clock budget of one :func:`train` call, counted from its start (restoring
      and compiling included); when it is spent, training stops at the end of the current
      ``log_every`` window, writes a checkpoint there and returns with ``complete=False``, so that
      ``resume`` continues it. ``None``: no limit.
  """

  steps: int
  batch_size: int
  learning_rate: float
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  decay_steps: int = 0
  grad_clip: float = 0.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_examples: int = 256
  checkpoint_every: int = 0
  resume: bool = False
  progress: bool = True
  stop_after_perfect_evals: int = 0
  steps_per_call: int = 1
  max_seconds: float | None = None

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "eval_examples", "steps_per_call"):
      _checks.positive_int(name, getattr(self, name))
    for name in ("eval_every", "checkpoint_every", "stop_after_perfect_evals", "warmup_steps",
                 "decay_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    if self.checkpoint_every % self.log_every:
      raise ValueError(f"checkpoint_every must be a multiple of log_every={self.log_every}, so that a "
                       f"resumed run logs the same windows; got {self.checkpoint_every}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}")
    if isinstance(self.grad_clip, bool) or not (isinstance(self.grad_clip, (int, float))
                                                and 0 <= self.grad_clip < math.inf):
      raise ValueError(f"grad_clip must be a non-negative number; got {self.grad_clip!r}")
    _checks.one_of("lr_schedule", self.lr_schedule, ("constant", "cosine"))
    if self.warmup_steps >= self.steps:
      raise ValueError(f"warmup_steps must be < steps={self.steps}; got {self.warmup_steps}")
    if self.decay_steps and self.lr_schedule != "cosine":
      raise ValueError(f"decay_steps needs lr_schedule='cosine'; got {self.lr_schedule!r}")
    if self.decay_steps > self.steps - self.warmup_steps:
      raise ValueError(f"decay_steps must be <= steps - warmup_steps = "
                       f"{self.steps - self.warmup_steps}; got {self.decay_steps}")
    if self.log_every % self.steps_per_call or self.eval_every % self.steps_per_call:
      raise ValueError(f"steps_per_call must divide log_every={self.log_every} and eval_every="
                       f"{self.eval_every}; got {self.steps_per_call}")
    if self.stop_after_perfect_evals and (not self.eval_every or self.eval_every % self.log_every):
      raise ValueError(f"stop_after_perfect_evals needs eval_every to be a positive multiple of "
                       f"log_every={self.log_every}, so that training stops on a logged step; got "
                       f"eval_every={self.eval_every}")
    if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float))
                                             and not isinstance(self.max_seconds, bool)
                                             and 0 < self.max_seconds < math.inf):
      raise ValueError(f"max_seconds must be a positive number or None; got {self.max_seconds!r}")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Adam at :func:`learning_rate_schedule`, after clipping to ``config.grad_clip`` if set (without
  it, plain Adam: the optimizer state of runs saved before clipping existed)."""
  adam = optax.adam(learning_rate_schedule(config))
  if not config.grad_clip:
    return adam
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)


def learning_rate_schedule(config: TrainConfig) -> float | optax.Schedule:
  """The learning rate of ``config``: a float when constant without warm-up (Adam's state then
  holds no step count, as in runs saved before schedules existed), else an optax schedule of the
  step."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.lr_schedule == "constant" and not warmup:
    return peak
  parts, bounds = [], []
  if warmup:
    parts, bounds = [optax.linear_schedule(0.0, peak, warmup)], [warmup]
  if config.lr_schedule == "constant":
    parts.append(optax.constant_schedule(peak))
  else:
    decay = config.decay_steps or config.steps - warmup
    if decay < config.steps - warmup:  # constant until the decay starts
      parts.append(optax.constant_schedule(peak))
      bounds.append(config.steps - decay)
    parts.append(optax.cosine_decay_schedule(peak, decay))
  return parts[0] if len(parts) == 1 else optax.join_schedules(parts, bounds)


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: the trained model, every metrics record, the final eval.

  ``stop_reason`` is ``"steps"`` (ran to ``config.steps``), ``"perfect_evals"`` (stopped by
  ``stop_after_perfect_evals``) or ``"time_limit"`` (``max_seconds`` spent: ``complete`` is False,
  the run continues with ``resume``, and ``final_accuracy``/``final_loss`` are those of the last
  ``"eval"`` record, NaN if none). ``stopped_at_step``: the step the model is at.
  ``learned_at_step``: see :func:`learned_at_step`.
  """

  model: nnx.Module
  records: list[dict[str, Any]]
  final_accuracy: float
  final_loss: float
  train_seconds: float
  stop_reason: str = "steps"
  stopped_at_step: int = 0
  learned_at_step: int | None = None

  @property
  def complete(self) -> bool:
    return self.stop_reason != "time_limit"


def perfect_streak(records: list[dict[str, Any]]) -> tuple[int, int | None]:
  """``(count, first_step)`` of the trailing run of ``"eval"`` records with accuracy exactly 1.0
  (by step order); ``(0, None)`` when the last eval is not perfect or there is none."""
  evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"])
  count, first = 0, None
  for r in reversed(evals):
    if r["accuracy"] != 1.0:
      break
    count, first = count + 1, r["step"]
  return count, first


def learned_at_step(records: list[dict[str, Any]]) -> int | None:
  """The first step of the final run of perfect evaluations (validation accuracy exactly 1.0 at
  every evaluation from there to the last one); None if the last evaluation is not perfect."""
  return perfect_streak(records)[1]


# ------------------------------------------------------------------------------------------------
# loss and evaluation


def masked_loss_and_accuracy(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and token accuracy over the positions where ``batch.mask`` is set.

  ``logits`` ``(batch, length, vocab)`` (any float dtype; computed in float32), ``batch`` fields
  ``(batch, length)``. Returns two float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
  count = jnp.maximum(batch.mask.sum(), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
  return (ce * batch.mask).sum() / count, (correct * batch.mask).sum() / count


def _counts(model, inputs, targets, mask, state):
  """``[loss sum, correct count, mask count]`` (float32), finiteness and the carried state."""
  if state is None:
    logits = model(inputs)
  else:
    logits, state = models.forward_with_state(model, inputs, state)
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(logits))
  return jnp.stack([(ce * mask).sum(), (correct * mask).sum(), mask.sum()]), finite, state


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk_counts(graphdef, params, inputs, targets, mask, state):
  """:func:`_counts` over one chunk of a batch, carrying ``state`` (the recurrent state or KV
  cache). Compiled once per ``(batch, chunk)`` shape (and cache shape)."""
  return _counts(nnx.merge(graphdef, params), inputs, targets, mask, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "task", "batch_size"))
def _whole_counts(graphdef, params, key, batches, *, task, batch_size):
  """:func:`_counts` summed over ``batches`` batches of ``task`` drawn from ``fold_in(key, i)``,
  each read whole, in one call (a loop on the device; ``batches`` is not static)."""
  model = nnx.merge(graphdef, params)

  def body(i, carry):
    totals, finite = carry
    batch = task.sample(jax.random.fold_in(key, i), batch_size)
    counts, ok, _ = _counts(model, batch.inputs, batch.targets, batch.mask, None)
    return totals + counts, finite & ok

  return lax.fori_loop(0, batches, body, (jnp.zeros(3, jnp.float32), jnp.array(True)))


@functools.partial(jax.jit, static_argnames=("size",))
def _slice_chunk(batch, start, *, size):
  return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=1), batch)


def evaluate(model: nnx.Module, task, key: jax.Array, examples: int, batch_size: int,
             chunk: int | None = None) -> tuple[float, float]:
  """Accuracy and loss of ``model`` on ``examples`` sequences of ``task`` drawn from ``key``.

  Args:
    model: a model of :mod:`experiments.models`; ``model(tokens)`` gives ``(b, l, vocab)`` logits.
    task: a task of :mod:`experiments.tasks`; a packed task is evaluated unpacked (its
      ``unpacked`` task: one example per row, at full length).
    key: seeds the validation set (the same key gives the same set).
    examples: number of sequences; rounded up to whole batches.
    batch_size: sequences per forward pass.
    chunk: when set (at most the task's length, and dividing it), each sequence is read
      ``chunk`` tokens at a time, from a fresh state, carrying the model's recurrent state or KV
      cache (:func:`experiments.models.init_state`),
      so activations never exceed ``(batch_size, chunk, ...)``, and the model is compiled for
      ``(batch_size, chunk)`` whatever the length (for a Mamba model; a Transformer's cache is
      sized by the length).

  The counts stay on the device until the end (one host sync per call). Without ``chunk``, every
  batch is drawn and read inside one compiled loop.

  Returns:
    ``(accuracy, loss)`` over the masked positions, as Python floats.

  Raises:
    FloatingPointError: if any logit is NaN or infinite.
  """
  _checks.positive_int("examples", examples)
  _checks.positive_int("batch_size", batch_size)
  task = getattr(task, "unpacked", task)
  length = task.length
  chunked = chunk is not None and _checks.positive_int("chunk", chunk) <= length
  if chunked and length % chunk:
    raise ValueError(f"chunk must divide the task length {length}; got {chunk}")
  graphdef, params = nnx.split(model)
  batches = math.ceil(examples / batch_size)
  if not chunked:
    totals, finite = _whole_counts(graphdef, params, key, batches, task=task,
                                   batch_size=batch_size)
    parts = [(totals, finite)]
  else:
    sample = sampler(task, batch_size)
    placement = jax.tree.leaves(params)[0].sharding
    parts = []
    for i in range(batches):
      batch = sample(jax.random.fold_in(key, i))
      # On the parameters' devices, as the state the compiled chunk returns (one compilation).
      state = jax.device_put(models.init_state(model, batch_size, length), placement)
      for start in range(0, length, chunk):
        counts, finite, state = _chunk_counts(graphdef, params,
                                              *_slice_chunk(batch, start, size=chunk), state)
        parts.append((counts, finite))
  parts = jax.device_get(parts)
  if not all(bool(finite) for _, finite in parts):
    raise FloatingPointError(f"non-finite logits while evaluating at length {length}")
  totals = np.sum([np.asarray(counts, np.float64) for counts, _ in parts], axis=0)
  count = max(totals[2], 1.0)
  return float(totals[1] / count), float(totals[0] / count)


# ------------------------------------------------------------------------------------------------
# training


def data_mesh() -> Mesh:
  """A one-axis ``("data",)`` mesh over every visible device."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def model_kwargs(batch) -> dict:
  """``segment_ids`` for the model when ``batch`` is a :class:`~experiments.tasks.PackedBatch`
  (several documents per row, each read as if alone); nothing otherwise."""
  return {"segment_ids": batch.segment_ids} if isinstance(batch, PackedBatch) else {}


def _train_step(model, optimizer, batch):
  """One Adam step on ``batch``, in place on ``model`` and ``optimizer``; (loss, accuracy, the
  gradient's global norm before any clipping)."""
  def loss_fn(model):
    return masked_loss_and_accuracy(model(batch.inputs, **model_kwargs(batch)), batch)

  (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, accuracy, optax.tree.norm(grads)


@functools.partial(jax.jit, donate_argnums=(0,),
                   static_argnames=("count", "graphdef", "task", "batch_size", "batch_sharding",
                                    "state_sharding"))
def _train_steps(state, data_key, start, loss_sum, acc_sum, grad_max, *, count, graphdef, task, batch_size,
                 batch_sharding, state_sharding):
  """Steps ``start .. start + count - 1`` in one call, each drawing its batch from
  ``fold_in(data_key, step)`` on the device and taking one :func:`_train_step`; with
  ``count > 1``, a loop on the device. ``state`` is ``nnx.state((model, optimizer))`` (donated);
  returns it updated, with ``loss_sum`` and ``acc_sum`` plus the steps' losses and accuracies and
  ``grad_max`` raised to their largest gradient norm (spikes show there). ``start`` is not static
  (one compilation serves every chunk of ``count`` steps); ``count`` is, so the loop's trip count
  is known to XLA (on a GPU it then runs the iterations without reading a loop condition back to
  the host)."""

  def body(i, carry):
    state, loss_sum, acc_sum, grad_max = carry
    model, optimizer = nnx.merge(graphdef, state)
    # The global batch, drawn inside the step: with several processes, every process runs this
    # same program on the same key and each device computes its own shard, so no process needs
    # the others' rows (nothing is sampled or placed from the host).
    batch = task.sample(jax.random.fold_in(data_key, start + i), batch_size)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    loss, accuracy, grad_norm = _train_step(model, optimizer, batch)
    state = jax.lax.with_sharding_constraint(nnx.state((model, optimizer)), state_sharding)
    return state, loss_sum + loss, acc_sum + accuracy, jnp.maximum(grad_max, grad_norm)

  carry = (state, loss_sum, acc_sum, grad_max)
  if count == 1:  # no loop: on the CPU a step inside a loop ran at half speed
    return body(0, carry)
  return lax.fori_loop(0, count, body, carry)


@functools.lru_cache(maxsize=None)
def sampler(task, batch_size: int, sharding: NamedSharding | None = None):
  """``key -> task.sample(key, batch_size)``, jitted once per task, batch size and output sharding."""
  return jax.jit(lambda key: task.sample(key, batch_size), out_shardings=sharding)


def read_records(path: str | os.PathLike, up_to_step: float = math.inf) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` up to ``up_to_step`` ([] if there is no file); a last
  line cut short by a kill is ignored."""
  path = Path(path)
  if not path.exists():
    return []
  records = []
  lines = path.read_text().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        break  # the last line of a run killed while writing it
      raise ValueError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
  return [r for r in records if r.get("step", 0) <= up_to_step]


def _is_main_process() -> bool:
  """Whether this process writes the run's files (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  """Waits for every process of a multi-process run (no-op in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _agreed(flag: bool) -> bool:
  """Process 0's ``flag`` on every process, so that all take the same branch (the loop's
  collectives would hang if one process stopped alone)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def _checkpoint_state(model, optimizer, data_key):
  return {"model": nnx.to_pure_dict(nnx.state(model)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
          "data_key": jax.random.key_data(data_key)}


def _restore(manager, step, model, optimizer, data_key, sharding):
  """Restores ``step`` into ``model`` and ``optimizer``; returns the saved data key."""
  target = _checkpoint_state(model, optimizer, data_key)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  for key, obj in (("model", model), ("optimizer", optimizer)):
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, restored[key])
    nnx.update(obj, state)
  return jax.random.wrap_key_data(restored["data_key"])


def _resume(manager, run_dir: Path, config: TrainConfig, model, optimizer, data_key, sharding):
  """The step to continue from and the data key, after restoring the latest good checkpoint
  (module docstring, "Resume semantics"). Raises ValueError where the run cannot continue."""
  ckpt_dir = run_dir / "checkpoints"
  interrupted = ssmax_checkpoint.interrupted_saves(ckpt_dir)
  if interrupted:
    warnings.warn(f"run {run_dir}: ignoring interrupted checkpoint saves "
                  f"{[p.name for p in interrupted]}", RuntimeWarning, stacklevel=3)
  steps = sorted(manager.all_steps()) if manager is not None else []
  if not steps:
    recorded = read_records(run_dir / "metrics.jsonl")
    if recorded:
      why = (f"only interrupted saves {[p.name for p in interrupted]}" if interrupted else
             "no checkpoints (it ran with checkpoint_every=0)")
      raise ValueError(f"cannot resume run {run_dir}: its metrics.jsonl has records up to step "
                       f"{max(r.get('step', 0) for r in recorded)} but it has {why}; rerun it in "
                       "a new directory (or delete this one)")
    return 0, data_key
  if steps[-1] > config.steps:
    raise ValueError(f"cannot resume run {run_dir} with steps={config.steps}: its latest "
                     f"checkpoint is at step {steps[-1]}, past that; pass steps >= {steps[-1]}")
  errors = []
  for step in reversed(steps):
    try:
      return step, _restore(manager, step, model, optimizer, data_key, sharding)
    except Exception as e:  # TensorStore, Orbax and KeyError on damaged files
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
      aside = run_dir / f"corrupt_checkpoint_{step}"
      warnings.warn(f"run {run_dir}: checkpoint step {step} is corrupt and is moved to {aside} "
                    f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous one",
                    RuntimeWarning, stacklevel=3)
      if _is_main_process():
        if aside.exists():
          shutil.rmtree(aside)
        shutil.move(str(ckpt_dir / str(step)), aside)
      _barrier(f"ssmax_train_corrupt_{step}")
      manager.reload()
  raise ValueError(f"cannot resume run {run_dir}: no checkpoint reads back (" + "; ".join(errors)
                   + "); the damaged steps were moved to corrupt_checkpoint_<step>")


def train(make_model: Callable[[nnx.Rngs], nnx.Module], task, config: TrainConfig,
          run_dir: str | os.PathLike, *, name: str = "",
          on_step: Callable[[int], None] | None = None) -> TrainResult:
  """Trains ``make_model(nnx.Rngs(seed))`` on ``task`` and returns the model and its metrics.

  The steps run in chunks of ``steps_per_call`` steps, each one compiled call
  (:func:`_train_steps`: the batch drawn and the step taken on the device, no host round trip);
  between chunks the loop logs, evaluates and checkpoints where due and checks
  ``stop_after_perfect_evals`` and ``max_seconds``.

  Args:
    make_model: builds the model from an ``nnx.Rngs``; the model maps ``(batch, length)`` int32
      tokens to ``(batch, length, vocab)`` logits.
    task: a task of :mod:`experiments.tasks` (frozen dataclass with ``sample(key, batch_size)``).
    config: the :class:`TrainConfig`.
    run_dir: directory for ``metrics.jsonl`` and ``checkpoints/``.
    name: label of the progress bar.
    on_step: called with the number of completed steps after each chunk of steps (after that
      chunk's logging, evaluation and checkpointing); an exception raised there stops the run
      like a crash.

  Returns:
    :class:`TrainResult`.
  """
  t_call = time.perf_counter()
  parallel.initialize_distributed()  # joins the other processes when launched as several
  main = _is_main_process()
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = data_mesh()
  n_dev = mesh.devices.size
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size must be a multiple of the {n_dev} devices; got {config.batch_size}")
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))

  model = make_model(nnx.Rngs(config.seed))
  lr = learning_rate_schedule(config)
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
  for obj in (model, optimizer):  # the same on every process: one seed
    nnx.update(obj, parallel.replicate(mesh, nnx.state(obj)))
  # Replicated like the state: with several processes, checkpoints take only global arrays.
  data_key = parallel.replicate(mesh, jax.random.fold_in(jax.random.key(config.seed), 1))
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  ckpt_dir = (run_dir / "checkpoints").absolute()
  metrics_path = run_dir / "metrics.jsonl"
  manager = None
  if (config.checkpoint_every or config.max_seconds is not None
      or (config.resume and ckpt_dir.is_dir())):
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  start = 0
  if not config.resume:
    if manager is not None and manager.latest_step() is not None:
      raise ValueError(f"run_dir {str(run_dir)!r} already holds checkpoints (latest step "
                       f"{manager.latest_step()}); resume it or choose another directory")
    if metrics_path.exists() and metrics_path.read_text().strip():
      raise ValueError(f"run_dir {str(run_dir)!r} already holds a run ({metrics_path.name} has "
                       "records); resume it or choose another directory")
  else:
    start, data_key = _resume(manager, run_dir, config, model, optimizer, data_key, replicated)

  records = read_records(metrics_path, start) if start else []
  # The final evaluation is always redone, so a finished run resumed keeps one copy of it.
  records = [r for r in records if not (r["kind"] == "eval" and r["step"] == config.steps)]
  time_offset = max((r["time_s"] for r in records if r["kind"] == "train"), default=0.0)
  _barrier("ssmax_train_records_read")  # every process has read the records before they change
  if main:
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

  graphdef, _ = nnx.split((model, optimizer))
  run_steps = functools.partial(_train_steps, graphdef=graphdef, task=task,
                                batch_size=config.batch_size, batch_sharding=sharded,
                                state_sharding=replicated)
  eval_batch = min(config.batch_size, config.eval_examples)
  patience = config.stop_after_perfect_evals

  def log(record):
    records.append(record)
    if main:
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")

  def run_eval(step):
    accuracy, loss = evaluate(model, task, eval_key, config.eval_examples, eval_batch)
    log({"kind": "eval", "step": step, "loss": loss, "accuracy": accuracy})
    return accuracy, loss

  saved = set(manager.all_steps()) if manager is not None else set()

  def save(step):
    if step not in saved:
      state = _checkpoint_state(model, optimizer, data_key)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
      saved.add(step)

  def next_multiple(step, every):
    return (step // every + 1) * every

  # A run resumed after it stopped early (its checkpoint is the stopping step, and the records up
  # to it end with the perfect evaluations) stops again before any step.
  stop_reason = "perfect_evals" if patience and perfect_streak(records)[0] >= patience else None
  bar = tqdm(total=config.steps, initial=start, desc=name or "train",
             disable=not (config.progress and main), dynamic_ncols=True, leave=True)
  t0 = time.perf_counter()
  zero = jax.device_put(jnp.zeros((), jnp.float32), replicated)
  window_loss = window_acc = window_grad = zero
  done = start
  # The model and optimizer state between steps; written back into `model` and `optimizer` only
  # where they are read (evaluation, checkpoint, on_step, return): the steps donate it.
  state, stale = nnx.state((model, optimizer)), False
  # Every chunk is steps_per_call steps (the last one may be shorter), so that one compilation
  # serves the run; chunks end on every log, evaluation and checkpoint step.
  while done < config.steps and stop_reason is None:
    end = min(next_multiple(done, config.steps_per_call), config.steps)
    state, window_loss, window_acc, window_grad = run_steps(state, data_key, done, window_loss,
                                                            window_acc, window_grad,
                                                            count=end - done)
    stale = True
    bar.update(end - done)
    done = end
    due_eval = config.eval_every and done % config.eval_every == 0 and done != config.steps
    due_save = config.checkpoint_every and done % config.checkpoint_every == 0
    if due_eval or due_save or on_step is not None:
      nnx.update((model, optimizer), state)
      stale = False
    if done % config.log_every == 0 or done == config.steps:
      n = config.log_every if done % config.log_every == 0 else done % config.log_every
      record = {"kind": "train", "step": done, "loss": float(window_loss) / n,
                "accuracy": float(window_acc) / n, "grad_norm_max": float(window_grad),
                "time_s": round(time_offset + time.perf_counter() - t0, 3)}
      if callable(lr):  # the rate of the window's last step
        record["lr"] = float(lr(done - 1))
      if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"training loss became {record['loss']} at step {done}")
      log(record)
      bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
      window_loss = window_acc = window_grad = zero
    if due_eval:
      run_eval(done)
      if patience and perfect_streak(records)[0] >= patience:
        stop_reason = "perfect_evals"
    if due_save:
      save(done)
    if (stop_reason is None and config.max_seconds is not None and done < config.steps
        and done % config.log_every == 0
        and _agreed(time.perf_counter() - t_call >= config.max_seconds)):  # process 0's clock
      stop_reason = "time_limit"
    if stop_reason is not None and manager is not None:
      if stale:
        nnx.update((model, optimizer), state)
        stale = False
      save(done)  # the step a resumed run continues (or stops again) from
    if on_step is not None:
      on_step(done)
  bar.close()
  if stale:
    nnx.update((model, optimizer), state)
  seconds = time.perf_counter() - t0
  if stop_reason is None:
    stop_reason = "steps"
    accuracy, loss = run_eval(config.steps)
  else:
    last = max((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"], default=None)
    accuracy, loss = (last["accuracy"], last["loss"]) if last else (math.nan, math.nan)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return TrainResult(model, records, accuracy, loss, seconds, stop_reason=stop_reason,
                     stopped_at_step=done, learned_at_step=learned_at_step(records))
