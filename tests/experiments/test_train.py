"""Training loop: masked loss, learning, bit-identical resume, 4-device data parallel, long evaluation."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models, tasks, train

TASK = tasks.SelectiveCopying(length=19, num_tokens=3, vocab_size=6)
SHAPE = models.ModelShape(vocab_size=6, d_model=8, n_layer=1, d_state=3, scan_backend="sequential")


def _make(rngs):
  return models.make_model("mamba_s6", SHAPE, rngs)


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _strip_time(records):
  return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_masked_loss_matches_numpy():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k1, (3, 7, 5)) * 3
  batch = tasks.Batch(inputs=jnp.zeros((3, 7), jnp.int32), targets=jax.random.randint(k2, (3, 7), 0, 5),
                      mask=(jax.random.uniform(k3, (3, 7)) < 0.4).astype(jnp.float32))
  loss, acc = train.masked_loss_and_accuracy(logits, batch)
  lg, t, m = (np.asarray(x, np.float64) for x in (logits, batch.targets, batch.mask))
  ce, hit = [], []
  for i in range(3):
    for j in range(7):
      if m[i, j]:
        z = lg[i, j] - lg[i, j].max()
        ce.append(np.log(np.exp(z).sum()) - z[int(t[i, j])])
        hit.append(float(np.argmax(lg[i, j]) == t[i, j]))
  np.testing.assert_allclose(float(loss), np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(float(acc), np.mean(hit), rtol=1e-6)


def test_few_steps_lower_the_loss(tmp_path):
  config = train.TrainConfig(steps=40, batch_size=16, learning_rate=1e-2, log_every=10, progress=False,
                             eval_examples=16)
  result = train.train(_make, TASK, config, tmp_path)
  losses = [r["loss"] for r in result.records if r["kind"] == "train"]
  assert len(losses) == 4
  # Start near log(8) (uniform over the padded vocabulary); learning the marginal of the data
  # tokens alone brings it to log(4).
  assert losses[0] > 1.6 and losses[-1] < 1.45, losses
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == result.records


def test_resume_after_crash_is_bit_identical(tmp_path):
  config = train.TrainConfig(steps=8, batch_size=4, learning_rate=5e-3, log_every=2, eval_every=2,
                             checkpoint_every=4, progress=False, eval_examples=4)
  full = train.train(_make, TASK, config, tmp_path / "full")

  def crash(step):
    if step == 6:  # two steps past the checkpoint at 4, whose metrics must be dropped
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train.train(_make, TASK, config, tmp_path / "cut", on_step=crash)
  cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in cut) == 6  # records past the checkpoint exist before resuming
  resumed = train.train(_make, TASK, dataclasses.replace(config, resume=True), tmp_path / "cut")
  a, b = _params(full.model), _params(resumed.model)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  file_records = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert _strip_time(file_records) == _strip_time(full.records)
  assert resumed.final_accuracy == full.final_accuracy
  # Resuming a finished run only redoes the final evaluation.
  again = train.train(_make, TASK, dataclasses.replace(config, resume=True), tmp_path / "cut")
  assert _strip_time(again.records) == _strip_time(full.records)


_FOUR_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from flax import nnx
    sys.path.insert(0, {tests!r})
    import test_train as t
    from experiments import train
    assert jax.device_count() == 4, jax.devices()
    try:
      train.train(t._make, t.TASK, train.TrainConfig(steps=2, batch_size=6, learning_rate=1e-2,
                  progress=False), {out!r} + "/bad")
      raise SystemExit("batch 6 on 4 devices was accepted")
    except ValueError as e:
      assert "batch_size must be a multiple of the 4 devices; got 6" in str(e), e
    r = train.train(t._make, t.TASK, t.FOUR_DEVICE_CONFIG, {out!r} + "/run")
    np.savez({out!r} + "/params.npz", **t._params(r.model))
    """)
FOUR_DEVICE_CONFIG = train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, log_every=3,
                                       progress=False, eval_examples=8)


def test_four_devices_match_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  script = _FOUR_DEVICE_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = train.train(_make, TASK, FOUR_DEVICE_CONFIG, tmp_path / "one")
  four = dict(np.load(tmp_path / "params.npz"))
  mine = _params(one.model)
  assert four.keys() == mine.keys()
  for k in mine:
    np.testing.assert_allclose(four[k], mine[k], rtol=1e-5, atol=1e-6, err_msg=k)
  recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  for r4, r1 in zip(recs, one.records, strict=True):
    np.testing.assert_allclose(r4["loss"], r1["loss"], rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba_s6", "mha_rope"])
def test_chunked_evaluation_equals_whole_sequence(name):
  shape = models.ModelShape(vocab_size=5, d_model=8, n_layer=2, d_state=3, n_head=2,
                            scan_backend="sequential")
  model = models.make_model(name, shape, nnx.Rngs(3))
  task = tasks.InductionHeads(length=96, vocab_size=5)
  key = jax.random.key(7)
  whole = train.evaluate(model, task, key, examples=6, batch_size=3)
  chunked = train.evaluate(model, task, key, examples=6, batch_size=3, chunk=32)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def test_long_induction_heads_evaluation_is_finite():
  shape = models.ModelShape(vocab_size=16, d_model=16, n_layer=2, d_state=16, scan_backend="sequential")
  model = models.make_model("mamba_s6", shape, nnx.Rngs(0))
  accuracy, loss = train.evaluate(model, tasks.InductionHeads(length=2**16), jax.random.key(0),
                                  examples=1, batch_size=1, chunk=2**13)
  assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def test_evaluate_raises_on_nan():
  model = _make(nnx.Rngs(0))
  model.embedding.embedding[...] = jnp.full_like(model.embedding.embedding[...], jnp.nan)
  with pytest.raises(FloatingPointError, match="non-finite logits while evaluating at length 19"):
    train.evaluate(model, TASK, jax.random.key(0), examples=2, batch_size=2)


def test_evaluate_rejects_chunk_not_dividing_length():
  with pytest.raises(ValueError, match="chunk must divide the task length 19"):
    train.evaluate(_make(nnx.Rngs(0)), TASK, jax.random.key(0), examples=2, batch_size=2, chunk=5)


def test_train_refuses_to_overwrite_checkpoints(tmp_path):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  config = train.TrainConfig(steps=8, batch_size=2, learning_rate=1e-3, log_every=2, checkpoint_every=4,
                             progress=False)
  with pytest.raises(ValueError, match="already holds checkpoints \\(latest step 4\\); resume it"):
    train.train(_make, TASK, config, tmp_path)


def test_config_rejects_checkpoint_every_off_log_grid():
  with pytest.raises(ValueError, match="checkpoint_every must be a multiple of log_every=10"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, checkpoint_every=15)


def test_config_rejects_negative_eval_every():
  with pytest.raises(ValueError, match="eval_every must be a non-negative integer"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, eval_every=-1)


def test_config_rejects_bad_learning_rate():
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    train.TrainConfig(steps=5, batch_size=2, learning_rate=0.0)


def test_make_model_rejects_unknown_name():
  with pytest.raises(ValueError, match="name must be one of"):
    models.make_model("lstm", SHAPE, nnx.Rngs(0))
