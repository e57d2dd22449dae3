"""ssmax.parallel and the training loop in a multi-process run: two local CPU processes.

The module fixture starts this file twice as a script (``--worker DIR``), as processes 0 and 1 of
one run (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, which
:func:`ssmax.parallel.initialize_distributed` reads), each with 2 CPU devices; JAX's CPU backend
runs the collectives across processes over TCP with Gloo. Each process writes what it computed
to DIR; the tests compare it with the same computation in this (single) process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROCESSES = 2
LOCAL_DEVICES = 2
# test_parallel.py's training-step model: 4 x 18 tokens split (2 data) x (2 seq).
MODEL = dict(d_model=6, n_layer=1, vocab_size=37, d_state=3, d_conv=3, expand=2,
             scan_backend="sequential")
TOKENS_SHAPE = (4, 19)
TIMEOUT_S = 240


def _tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, MODEL["vocab_size"], TOKENS_SHAPE).astype(np.int32)


def _train_config():
  from experiments import train

  return train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, log_every=3,
                           checkpoint_every=3, progress=False, eval_examples=8)


def _train_task():
  from experiments import tasks

  return tasks.SelectiveCopying(length=19, num_tokens=3, vocab_size=6)


def _make_train_model(rngs):
  from experiments import models

  shape = models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3,
                            scan_backend="sequential")
  return models.make_model("mamba_s6", shape, rngs)


def _loss_fn(graphdef, n_tokens):
  import jax.numpy as jnp
  import optax
  from flax import nnx

  def local_loss(params, inputs, targets):  # this shard's piece, summed over the global count
    logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum() / n_tokens

  return local_loss


# ----------------------------------------------------------------------------------------------
# The two processes.


def _worker(out_dir: str) -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  from ssmax import parallel

  joined = parallel.initialize_distributed()  # before anything starts JAX's backend
  me = jax.process_index()
  out, errors = {}, {}

  def error(name, fn, kind=ValueError):
    try:
      fn()
      errors[name] = None
    except kind as e:
      errors[name] = str(e)

  from flax import nnx
  from jax.sharding import Mesh

  from ssmax import nn as snn

  info = {"joined": joined, "again": parallel.initialize_distributed(),
          "process_count": jax.process_count(), "device_count": jax.device_count(),
          "rows_2x2": _span(parallel.process_rows(parallel.make_mesh(2, 2), 4)),
          "rows_4x1": _span(parallel.process_rows(parallel.make_mesh(4, 1), 8)),
          "rows_1x4": _span(parallel.process_rows(parallel.make_mesh(1, 4), 4)),
          "rows_no_data_axis": _span(parallel.process_rows(parallel.make_mesh(2, 2), 4,
                                                           data_axis=None))}
  # Devices alternating between processes along the data axis: no contiguous rows.
  mixed = np.asarray(jax.devices(), dtype=object).reshape(PROCESSES, LOCAL_DEVICES).T.reshape(-1, 1)
  error("rows_not_contiguous",
        lambda: parallel.process_rows(Mesh(mixed, ("data", "seq")), 8))

  # One training step's loss and gradients on a (data=2, seq=2) mesh: process p holds data
  # block p (rows 2p, 2p + 1) and splits their length over its two devices.
  mesh = parallel.make_mesh(2, 2)
  tokens = _tokens()
  rows = parallel.process_rows(mesh, len(tokens))
  inputs, targets = parallel.shard_local_batch(mesh, (tokens[rows, :-1], tokens[rows, 1:]))
  info["global_shape"] = list(inputs.shape)
  info["local_rows_shape"] = list(tokens[rows, :-1].shape)
  from_global = parallel.shard_batch(mesh, (tokens[:, :-1], tokens[:, 1:]))
  info["same_as_shard_batch"] = all(
      a.sharding == b.sharding and all(sa.index == sb.index and np.array_equal(sa.data, sb.data)
                                       for sa, sb in zip(a.addressable_shards,
                                                         b.addressable_shards))
      for a, b in zip((inputs, targets), from_global))
  config = snn.MambaConfig(**MODEL, sequence_axis="seq")
  graphdef, params = nnx.split(snn.MambaLM(config, rngs=nnx.Rngs(0)))
  params = parallel.replicate(mesh, params)
  loss, grads = jax.jit(parallel.value_and_grad(_loss_fn(graphdef, inputs.size), mesh))(
      params, inputs, targets)
  out["loss"] = np.asarray(loss)  # replicated: every process reads the whole value
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    out[f"grad{jax.tree_util.keystr(path)}"] = np.asarray(leaf)

  # Misuse: each process's own rows given to shard_batch, which takes the global batch.
  error("shard_batch_local_rows",
        lambda: parallel.shard_batch(mesh, (tokens[rows, :-1], tokens[rows, 1:])))
  error("replicate_differs", lambda: parallel.replicate(mesh, np.float32(me)), AssertionError)

  # The training loop, then resumed from its checkpoint (a finished run: the final evaluation).
  from experiments import train

  run_dir = Path(out_dir) / "run"
  result = train.train(_make_train_model, _train_task(), _train_config(), run_dir)
  resumed = train.train(_make_train_model, _train_task(),
                        dataclasses.replace(_train_config(), resume=True), run_dir)
  info["records"] = result.records
  info["resumed_records"] = resumed.records
  out.update({"train/" + k: v for k, v in _params(result.model).items()})

  np.savez(os.path.join(out_dir, f"process{me}.npz"), **out)
  with open(os.path.join(out_dir, f"process{me}.json"), "w") as f:
    json.dump({"info": info, "errors": errors}, f)


def _params(model) -> dict[str, np.ndarray]:
  from flax import nnx

  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _span(rows: slice) -> list[int]:
  return [rows.start, rows.stop]


# ----------------------------------------------------------------------------------------------
# The tests, in this single process.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Run:
  """The two processes, started at once; :meth:`results` waits for them (the tests compute their
  single-process references first, while the processes run)."""

  def __init__(self, out: Path):
    self.out = out
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES=str(PROCESSES),
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")
    env.pop("XLA_FLAGS", None)
    # Output to files: a full pipe would block one process and with it the other's collectives.
    self.logs = [out / f"process{i}.log" for i in range(PROCESSES)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(out)], env=dict(env, JAX_PROCESS_ID=str(i)),
            cwd=os.path.dirname(__file__), stdout=f, stderr=subprocess.STDOUT))
    self.deadline = time.monotonic() + TIMEOUT_S
    self._results = None

  def results(self):
    if self._results is None:
      try:  # a hang (a collective one process never reaches) fails instead of blocking
        for p in self.procs:
          p.wait(timeout=max(self.deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"the processes did not finish in {TIMEOUT_S} s:\n" + self._tails())
      if any(p.returncode for p in self.procs):
        pytest.fail(f"exit codes {[p.returncode for p in self.procs]}:\n" + self._tails())
      self._results = [(dict(np.load(self.out / f"process{i}.npz")),
                        json.loads((self.out / f"process{i}.json").read_text()))
                       for i in range(PROCESSES)]
    return self._results

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def _tails(self) -> str:
    return "\n".join(f"--- process {i}:\n{log.read_text()[-4000:]}"
                     for i, log in enumerate(self.logs))


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
  run = _Run(tmp_path_factory.mktemp("multiprocess"))
  yield run
  run.kill()


@pytest.fixture(scope="module")
def one_process(processes, tmp_path_factory):
  """The same computations in this single process (one device), while the two processes run:
  the loss and gradients of the step, and the training run."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments import train
  from ssmax import nn as snn

  tokens = _tokens()
  inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  graphdef, params = nnx.split(snn.MambaLM(snn.MambaConfig(**MODEL), rngs=nnx.Rngs(0)))
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, inputs.size)))(
      params, inputs, targets)
  step = {"loss": np.asarray(loss)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    step[f"grad{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  run = train.train(_make_train_model, _train_task(), _train_config(),
                    tmp_path_factory.mktemp("one_process"))
  return step, run


def test_value_and_grad_over_two_processes_matches_one_process(processes, one_process):
  from oracle import rel_err

  want, _ = one_process
  for arrays, _ in processes.results():
    assert arrays.keys() - {k for k in arrays if k.startswith("train/")} == want.keys()
    for k, v in want.items():
      assert arrays[k].dtype == np.float32 and arrays[k].shape == v.shape, k
      assert rel_err(arrays[k], v) < 1e-5, k


def test_shard_batch_refuses_rows_that_differ_between_processes(processes):
  for _, report in processes.results():
    errors = report["errors"]
    assert errors["shard_batch_local_rows"] is not None, "shard_batch took per-process rows"
    assert "shard_batch takes the global batch, the same on every process" in (
        errors["shard_batch_local_rows"])
    assert "use shard_local_batch" in errors["shard_batch_local_rows"]
    assert errors["replicate_differs"] is not None, "replicate took values that differ"
    assert "not the same on each process" in errors["replicate_differs"]


def test_training_over_two_processes_matches_one_process(processes, one_process):
  _, one = one_process
  strip = lambda records: [{k: v for k, v in r.items() if k != "time_s"} for r in records]
  out, results = processes.out, processes.results()
  written = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
  for arrays, report in results:
    records = report["info"]["records"]
    assert strip(report["info"]["resumed_records"]) == strip(records)
    assert [(r["kind"], r["step"]) for r in records] == [(r["kind"], r["step"])
                                                          for r in one.records]
    for mine, want in zip(records, one.records):
      np.testing.assert_allclose(mine["loss"], want["loss"], rtol=1e-5)
    for k, v in _params(one.model).items():
      np.testing.assert_allclose(arrays["train/" + k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # Written once, by process 0 (two writers would duplicate or interleave the lines).
  assert strip(written) == strip(results[0][1]["info"]["resumed_records"])
  assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["3", "6"]


def test_processes_join_and_hold_their_rows(processes):
  for i, (_, report) in enumerate(processes.results()):
    info = report["info"]
    assert info["joined"] and info["again"]
    assert info["process_count"] == PROCESSES and info["device_count"] == PROCESSES * LOCAL_DEVICES
    assert info["rows_2x2"] == [2 * i, 2 * i + 2]
    assert info["rows_4x1"] == [4 * i, 4 * i + 4]
    assert info["rows_1x4"] == [0, 4]  # one data block, its length split over both processes
    assert info["rows_no_data_axis"] == [0, 4]
    assert "not contiguous rows" in (report["errors"]["rows_not_contiguous"] or "no error")
    assert info["local_rows_shape"] == [2, 18] and info["global_shape"] == [4, 18]
    assert info["same_as_shard_batch"]


def test_initialize_distributed_alone_is_a_no_op(monkeypatch):
  from ssmax import parallel

  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not parallel.initialize_distributed()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert not parallel.initialize_distributed()


def test_shard_local_batch_in_one_process_is_shard_batch():
  from ssmax import parallel

  mesh = parallel.make_mesh(1, 1)
  tokens = _tokens()
  assert parallel.process_rows(mesh, len(tokens)) == slice(0, len(tokens))
  local = parallel.shard_local_batch(mesh, {"tokens": tokens, "lengths": np.arange(4)})
  whole = parallel.shard_batch(mesh, {"tokens": tokens, "lengths": np.arange(4)})
  for k in whole:
    assert local[k].sharding == whole[k].sharding and local[k].shape == whole[k].shape
    np.testing.assert_array_equal(local[k], whole[k])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/, beside ssmax
  _worker(sys.argv[2])
