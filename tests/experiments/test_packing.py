"""Packed training data (``--pack``): Induction Heads examples of mixed lengths packed into rows,
told apart by ``segment_ids``; the training loop hands them to the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models, tasks, train

TASK = tasks.PackedInductionHeads(length=40, vocab_size=8, documents=3, min_length=5)
SHAPE = models.ModelShape(vocab_size=8, d_model=8, n_layer=1, d_state=3, scan_backend="sequential")


def _documents(ids_row):
  starts = [0] + [t for t in range(1, len(ids_row)) if ids_row[t] != ids_row[t - 1]]
  return list(zip(starts, starts[1:] + [len(ids_row)]))


def test_packed_rows_hold_whole_induction_heads_examples():
  batch = jax.jit(TASK.sample, static_argnums=1)(jax.random.key(0), 16)
  assert isinstance(batch, tasks.PackedBatch)
  inputs, targets, mask, ids = (np.asarray(x) for x in batch)
  assert inputs.shape == targets.shape == mask.shape == ids.shape == (16, 40)
  lengths = []
  for b in range(16):
    docs = _documents(ids[b])
    assert len(docs) == TASK.documents
    for s, e in docs:
      doc = inputs[b, s:e]
      lengths.append(e - s)
      assert e - s >= TASK.min_length
      special = np.flatnonzero(doc == TASK.special_token)
      assert len(special) == 2 and special[1] == e - s - 1, doc  # one inside, one at the end
      assert targets[b, e - 1] == doc[special[0] + 1]
      np.testing.assert_array_equal(mask[b, s:e], np.eye(e - s)[-1])
  assert len(set(lengths)) > 5  # mixed lengths


def test_train_step_reads_segment_ids():
  # The packed loss equals the loss of the documents run one by one (the model sees each alone).
  model = models.make_model("mamba_s6", SHAPE, nnx.Rngs(0))
  batch = TASK.sample(jax.random.key(1), 2)
  logits = model(batch.inputs, **train.model_kwargs(batch))
  loss, _ = train.masked_loss_and_accuracy(logits, batch)
  per_doc = []
  for b in range(2):
    for s, e in _documents(np.asarray(batch.segment_ids[b])):
      alone = model(batch.inputs[b:b + 1, s:e])[0, -1].astype(jnp.float32)
      per_doc.append(-jax.nn.log_softmax(alone)[batch.targets[b, e - 1]])
  np.testing.assert_allclose(float(loss), float(np.mean(per_doc)), rtol=1e-5)
  assert train.model_kwargs(tasks.InductionHeads(length=8).sample(jax.random.key(2), 1)) == {}


def test_packed_training_learns_and_evaluates_unpacked(tmp_path):
  config = train.TrainConfig(steps=20, batch_size=8, learning_rate=1e-2, log_every=10,
                             progress=False, eval_examples=8)
  result = train.train(lambda rngs: models.make_model("mamba_s6", SHAPE, rngs), TASK, config,
                       tmp_path)
  losses = [r["loss"] for r in result.records if r["kind"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
  assert 0.0 <= result.final_accuracy <= 1.0 and np.isfinite(result.final_loss)
  assert TASK.with_length(64) == tasks.InductionHeads(length=64, vocab_size=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_length=2), r"min_length must be >= 3"),
    (dict(documents=0), r"documents must be a positive integer"),
    (dict(length=10, documents=3, min_length=4), r"documents \* min_length must be <= length=10"),
    (dict(vocab_size=1), r"vocab_size must be >= 2"),
])
def test_packed_task_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tasks.PackedInductionHeads(**kwargs)


def test_pack_flag_refuses_attention_models(tmp_path):
  # In a subprocess: each task entry point defines the same absl flags.
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-m", "experiments.induction_heads", "--pack",
                         "--models=mamba_s6,mha_abs", f"--out_dir={tmp_path}", "--steps=1"],
                        capture_output=True, text=True, timeout=300, cwd=root)
  assert proc.returncode != 0
  assert "--pack trains Mamba-family models only" in proc.stderr + proc.stdout
