"""One training loop for the synthetic tasks: Adam at a constant learning rate, data parallel, resumable.

:func:`train` builds a model, replicates its parameters over a ``jax.sharding.Mesh`` of every
visible device (one ``"data"`` axis), shards each batch along it, and runs an ``nnx.jit``-ed step
(masked cross-entropy, :func:`optax.adam`). Batches are drawn inside JAX from
``fold_in(data_key, step)``, so the data stream is a function of the seed and the step alone.
Every ``checkpoint_every`` steps Orbax saves the parameters, the optimizer state, the step and the
data key; ``resume=True`` restores the latest checkpoint and continues bit-identically (the
metrics file is cut back to the restored step; see "Resume semantics" below). Progress goes to a tqdm bar and to
``metrics.jsonl``: ``{"kind": "train", "step", "loss", "accuracy", "time_s"}`` averaged over the
last ``log_every`` steps and ``{"kind": "eval", "step", "loss", "accuracy"}`` on a fixed
validation set.

:func:`evaluate` scores a model on a task and can walk long sequences in chunks, carrying the
recurrent state (Mamba) or the KV cache (Transformer) from one chunk to the next, so that memory
stays bounded by the chunk length; it raises on non-finite logits instead of reporting NaN.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from experiments import models
from experiments.tasks import Batch, PackedBatch
from ssmax import _checks
from ssmax.io import checkpoint as ssmax_checkpoint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What :func:`train` does.

  Attributes:
    steps: total optimizer steps (a resumed run continues up to this count).
    batch_size: global batch, a multiple of the number of devices.
    learning_rate: constant Adam learning rate.
    seed: seeds the parameters (``nnx.Rngs(seed)``) and the data stream.
    log_every: steps averaged into one ``"train"`` record.
    eval_every: steps between ``"eval"`` records (0: only after the last step).
    eval_examples: size of the fixed validation set.
    checkpoint_every: steps between checkpoints (0: none); a multiple of ``log_every``.
    resume: continue the run in the run directory from its latest good checkpoint (see
      "Resume semantics" in the module docstring).
    progress: show the tqdm bar.
  """

  steps: int
  batch_size: int
  learning_rate: float
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_examples: int = 256
  checkpoint_every: int = 0
  resume: bool = False
  progress: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "eval_examples"):
      _checks.positive_int(name, getattr(self, name))
    for name in ("eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    if self.checkpoint_every % self.log_every:
      raise ValueError(f"checkpoint_every must be a multiple of log_every={self.log_every}, so that a "
                       f"resumed run logs the same windows; got {self.checkpoint_every}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}")


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: the trained model, every metrics record, the final eval."""

  model: nnx.Module
  records: list[dict[str, Any]]
  final_accuracy: float
  final_loss: float
  train_seconds: float


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


@nnx.jit
def _chunk_counts(model, inputs, targets, mask, state):
  """Loss sum, correct count, mask count and finiteness over one chunk; carries ``state``."""
  if state is None:
    logits = model(inputs)
  else:
    logits, state = models.forward_with_state(model, inputs, state)
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(logits))
  return (ce * mask).sum(), (correct * mask).sum(), mask.sum(), finite, state


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
    chunk: when set and shorter than the task, each sequence is read ``chunk`` tokens at a time,
      carrying the model's recurrent state or KV cache (:func:`experiments.models.init_state`),
      so activations never exceed ``(batch_size, chunk, ...)``.

  Returns:
    ``(accuracy, loss)`` over the masked positions, as Python floats.

  Raises:
    FloatingPointError: if any logit is NaN or infinite.
  """
  _checks.positive_int("examples", examples)
  _checks.positive_int("batch_size", batch_size)
  task = getattr(task, "unpacked", task)
  length = task.length
  chunked = chunk is not None and _checks.positive_int("chunk", chunk) < length
  if chunked and length % chunk:
    raise ValueError(f"chunk must divide the task length {length}; got {chunk}")
  sample = sampler(task, batch_size)
  totals = np.zeros(3)
  for i in range(math.ceil(examples / batch_size)):
    batch = sample(jax.random.fold_in(key, i))
    if not chunked:
      parts = [_chunk_counts(model, *batch, None)]
    else:
      state = models.init_state(model, batch_size, length)
      parts = []
      for start in range(0, length, chunk):
        sl = slice(start, start + chunk)
        *counts, state = _chunk_counts(model, batch.inputs[:, sl], batch.targets[:, sl],
                                       batch.mask[:, sl], state)
        parts.append(counts)
    for loss_sum, correct, count, finite, *_ in parts:
      if not bool(finite):
        raise FloatingPointError(f"non-finite logits while evaluating at length {length}")
      totals += (float(loss_sum), float(correct), float(count))
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


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def _train_step(model, optimizer, batch):
  def loss_fn(model):
    return masked_loss_and_accuracy(model(batch.inputs, **model_kwargs(batch)), batch)

  (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, accuracy


@functools.lru_cache(maxsize=None)
def sampler(task, batch_size: int, sharding: NamedSharding | None = None):
  """``key -> task.sample(key, batch_size)``, jitted once per task, batch size and output sharding."""
  return jax.jit(lambda key: task.sample(key, batch_size), out_shardings=sharding)


def _read_records(path: Path, up_to_step: float = math.inf) -> list[dict[str, Any]]:
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
    recorded = _read_records(run_dir / "metrics.jsonl")
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
      if aside.exists():
        shutil.rmtree(aside)
      shutil.move(str(ckpt_dir / str(step)), aside)
      manager.reload()
  raise ValueError(f"cannot resume run {run_dir}: no checkpoint reads back (" + "; ".join(errors)
                   + "); the damaged steps were moved to corrupt_checkpoint_<step>")


def train(make_model: Callable[[nnx.Rngs], nnx.Module], task, config: TrainConfig,
          run_dir: str | os.PathLike, *, name: str = "",
          on_step: Callable[[int], None] | None = None) -> TrainResult:
  """Trains ``make_model(nnx.Rngs(seed))`` on ``task`` and returns the model and its metrics.

  Args:
    make_model: builds the model from an ``nnx.Rngs``; the model maps ``(batch, length)`` int32
      tokens to ``(batch, length, vocab)`` logits.
    task: a task of :mod:`experiments.tasks` (frozen dataclass with ``sample(key, batch_size)``).
    config: the :class:`TrainConfig`.
    run_dir: directory for ``metrics.jsonl`` and ``checkpoints/``.
    name: label of the progress bar.
    on_step: called with the number of completed steps after each step (after that step's
      logging and checkpointing); an exception raised there stops the run like a crash.

  Returns:
    :class:`TrainResult`.
  """
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = data_mesh()
  n_dev = mesh.devices.size
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size must be a multiple of the {n_dev} devices; got {config.batch_size}")
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))

  model = make_model(nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
  for obj in (model, optimizer):
    nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
  data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  ckpt_dir = (run_dir / "checkpoints").absolute()
  metrics_path = run_dir / "metrics.jsonl"
  manager = None
  if config.checkpoint_every or (config.resume and ckpt_dir.is_dir()):
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

  records = _read_records(metrics_path, start) if start else []
  # The final evaluation is always redone, so a finished run resumed keeps one copy of it.
  records = [r for r in records if not (r["kind"] == "eval" and r["step"] == config.steps)]
  time_offset = max((r["time_s"] for r in records if r["kind"] == "train"), default=0.0)
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

  sample = sampler(task, config.batch_size, sharded)
  step_fn = nnx.cached_partial(_train_step, model, optimizer)
  eval_batch = min(config.batch_size, config.eval_examples)

  def log(record):
    records.append(record)
    with metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def run_eval(step):
    accuracy, loss = evaluate(model, task, eval_key, config.eval_examples, eval_batch)
    log({"kind": "eval", "step": step, "loss": loss, "accuracy": accuracy})
    return accuracy, loss

  bar = tqdm(total=config.steps, initial=start, desc=name or "train", disable=not config.progress,
             dynamic_ncols=True, leave=True)
  t0 = time.perf_counter()
  window_loss = window_acc = 0.0
  for step in range(start, config.steps):
    batch = sample(jax.random.fold_in(data_key, step))
    loss, accuracy = step_fn(batch)
    window_loss, window_acc = window_loss + loss, window_acc + accuracy
    done = step + 1
    bar.update(1)
    if done % config.log_every == 0 or done == config.steps:
      n = config.log_every if done % config.log_every == 0 else done % config.log_every
      record = {"kind": "train", "step": done, "loss": float(window_loss) / n,
                "accuracy": float(window_acc) / n, "time_s": round(time_offset + time.perf_counter() - t0, 3)}
      if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"training loss became {record['loss']} at step {done}")
      log(record)
      bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
      window_loss = window_acc = 0.0
    if config.eval_every and done % config.eval_every == 0 and done != config.steps:
      run_eval(done)
    if config.checkpoint_every and done % config.checkpoint_every == 0:
      state = _checkpoint_state(model, optimizer, data_key)
      manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    if on_step is not None:
      on_step(done)
  bar.close()
  seconds = time.perf_counter() - t0
  accuracy, loss = run_eval(config.steps)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return TrainResult(model, records, accuracy, loss, seconds)
