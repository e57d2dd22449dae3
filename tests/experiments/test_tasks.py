"""Task generators against an independent NumPy reading of each sequence."""

import jax
import numpy as np
import pytest

from experiments import tasks


def _copying_reference(inputs, num_tokens, vocab_size):
  """NumPy loop: the data tokens are the non-noise tokens before the markers, in order."""
  b, l = inputs.shape
  targets = np.zeros((b, l), np.int64)
  mask = np.zeros((b, l))
  for i in range(b):
    data = [t for t in inputs[i, :l - num_tokens] if t != 0]
    assert len(data) == num_tokens
    assert all(1 <= t <= vocab_size - 2 for t in data)
    assert all(t == vocab_size - 1 for t in inputs[i, l - num_tokens:])
    targets[i, l - num_tokens:] = data
    mask[i, l - num_tokens:] = 1.0
  return targets, mask


@pytest.mark.parametrize("selective", [False, True])
def test_copying_targets_match_numpy(selective):
  task = tasks.Copying(length=53, num_tokens=7, vocab_size=9, selective=selective)
  batch = jax.jit(task.sample, static_argnums=1)(jax.random.key(3), 11)
  inputs, targets, mask = (np.asarray(x) for x in batch)
  assert inputs.shape == targets.shape == mask.shape == (11, 53)
  want_t, want_m = _copying_reference(inputs, 7, 9)
  np.testing.assert_array_equal(targets, want_t)
  np.testing.assert_array_equal(mask, want_m)
  positions = [np.flatnonzero(row[:53 - 7]) for row in inputs]
  if selective:
    # Random positions: not all at the front, and different across the batch.
    assert any(p[-1] > 6 for p in positions)
    assert len({tuple(p) for p in positions}) > 1
  else:
    for p in positions:
      np.testing.assert_array_equal(p, np.arange(7))


def test_selective_copying_positions_cover_region_uniformly():
  task = tasks.SelectiveCopying(length=23, num_tokens=3, vocab_size=5)
  inputs = np.asarray(task.sample(jax.random.key(0), 4000).inputs)
  counts = (inputs[:, :20] != 0).sum(0)
  # Each of the 20 slots holds a data token with probability 3/20.
  np.testing.assert_allclose(counts / 4000, 3 / 20, atol=0.03)
  values = inputs[:, :20][inputs[:, :20] != 0]
  np.testing.assert_allclose(np.bincount(values, minlength=5)[1:4] / values.size, 1 / 3, atol=0.03)


def test_induction_heads_targets_match_numpy():
  task = tasks.InductionHeads(length=37, vocab_size=6)
  inputs, targets, mask = (np.asarray(x) for x in jax.jit(task.sample, static_argnums=1)(jax.random.key(5), 13))
  special = 5
  for i in range(13):
    where = np.flatnonzero(inputs[i] == special)
    assert len(where) == 2 and where[1] == 36 and where[0] <= 34
    want_t = np.zeros(37, np.int64)
    want_t[36] = inputs[i, where[0] + 1]
    want_m = np.zeros(37)
    want_m[36] = 1.0
    np.testing.assert_array_equal(targets[i], want_t)
    np.testing.assert_array_equal(mask[i], want_m)


def test_induction_heads_special_position_uniform():
  task = tasks.InductionHeads(length=9, vocab_size=4)
  inputs = np.asarray(task.sample(jax.random.key(1), 7000).inputs)
  first = np.argmax(inputs == 3, axis=1)
  np.testing.assert_allclose(np.bincount(first, minlength=7) / 7000, 1 / 7, atol=0.02)


def test_sample_depends_only_on_key():
  task = tasks.SelectiveCopying(length=41, num_tokens=5, vocab_size=7)
  a, b, c = (task.sample(jax.random.key(k), 3) for k in (8, 8, 9))
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, c.inputs)


def test_copying_rejects_small_vocab():
  with pytest.raises(ValueError, match="vocab_size must be >= 3"):
    tasks.Copying(length=10, num_tokens=2, vocab_size=2)


def test_copying_rejects_short_length():
  with pytest.raises(ValueError, match="length must be >= 2 \\* num_tokens = 10"):
    tasks.SelectiveCopying(length=9, num_tokens=5)


def test_copying_rejects_bad_num_tokens():
  with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
    tasks.Copying(num_tokens=0)


def test_induction_heads_rejects_short_length():
  with pytest.raises(ValueError, match="length must be >= 3"):
    tasks.InductionHeads(length=2)


def test_induction_heads_rejects_small_vocab():
  with pytest.raises(ValueError, match="vocab_size must be >= 2"):
    tasks.InductionHeads(vocab_size=1)


def test_sample_rejects_bad_batch_size():
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    tasks.InductionHeads(length=8).sample(jax.random.key(0), 0)
