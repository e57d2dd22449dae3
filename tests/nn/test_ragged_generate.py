"""Batched generation from prompts of different lengths (left-padded, ``prompt_lengths``): every
row continues exactly as its prompt generated alone; sampling never draws padded vocabulary ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmax import nn as snn
from test_generate import make_model, tokens_for

PROMPT = 6
LENGTHS = np.array([6, 1, 3, 1], np.int32)  # 1 < d_conv - 1: the conv state starts partly empty
NEW = 6


def left_padded(model, lengths, pad, seed):
  """``(len(lengths), PROMPT)`` prompts, row ``b`` ending in its ``lengths[b]`` tokens."""
  tokens = np.array(tokens_for(model, (len(lengths), PROMPT), seed))
  for b, n in enumerate(lengths):
    tokens[b, :PROMPT - n] = pad
  return tokens


def test_ragged_greedy_equals_one_by_one():
  model = make_model(3)
  prompt = left_padded(model, LENGTHS, 0, 4)
  out = model.generate(prompt, NEW, prompt_lengths=LENGTHS)
  assert out.shape == (4, PROMPT + NEW) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :PROMPT], prompt)
  for b, n in enumerate(LENGTHS):
    alone = model.generate(prompt[b:b + 1, PROMPT - n:], NEW)
    np.testing.assert_array_equal(out[b, PROMPT:], alone[0, n:], err_msg=f"row {b}")
  # What the padding holds does not matter.
  other = left_padded(model, LENGTHS, 36, 4)
  np.testing.assert_array_equal(model.generate(other, NEW, prompt_lengths=LENGTHS)[:, PROMPT:],
                                out[:, PROMPT:])


@pytest.mark.parametrize("overrides", [None, dict(ssm="s4d", s4d_init="lin", d_state=4)],
                         ids=["selective", "s4d"])
def test_ragged_prefill_cache_equals_one_by_one(overrides):
  # What decoding continues from: last logits and every layer's conv and SSM state.
  model = make_model(5, **(overrides or {}))
  prompt = left_padded(model, LENGTHS, 0, 6)
  ids = (np.arange(PROMPT)[None] >= PROMPT - LENGTHS[:, None]).astype(np.int32)
  logits, cache = jax.jit(lambda m, t, s: m.prefill(t, segment_ids=s))(model, prompt, ids)
  alone = jax.jit(lambda m, t: m.prefill(t))
  for b, n in enumerate(LENGTHS):
    want, want_cache = alone(model, prompt[b:b + 1, PROMPT - n:])
    np.testing.assert_allclose(logits[b:b + 1], want, rtol=2e-5, atol=2e-6)
    for got, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
      np.testing.assert_allclose(got[b:b + 1], ref, rtol=2e-5, atol=2e-6)


def test_ragged_sampling_stays_in_vocab():
  model = make_model(9)
  emb = model.embedding.embedding
  emb[...] = emb[...].at[37:].set(50.0)  # padded vocabulary rows far more likely
  prompt = left_padded(model, LENGTHS, 0, 10)
  out = model.generate(prompt, NEW, key=jax.random.key(1), temperature=1.3, top_p=0.95,
                       prompt_lengths=LENGTHS)
  assert int(out.max()) < 37


def test_sample_logits_vocab_size_masks_padded_ids():
  logits = jnp.zeros((64, 8)).at[:, 5:].set(100.0)  # ids 5..7 are padding
  assert int(jnp.max(snn.sample_logits(logits, None, vocab_size=5))) < 5
  drawn = snn.sample_logits(logits, jax.random.key(2), temperature=2.0, top_k=3, vocab_size=5)
  assert int(jnp.max(drawn)) < 5
  assert int(jnp.max(snn.sample_logits(logits, None))) >= 5  # without it, all ids are fair game
  with pytest.raises(ValueError, match="vocab_size must be a positive integer; got 0"):
    snn.sample_logits(logits, None, vocab_size=0)


@pytest.mark.parametrize("lengths, match", [
    (np.array([6, 1, 3], np.int32), r"prompt_lengths must have shape \(4,\)"),
    (np.array([6.0, 1, 3, 1]), r"prompt_lengths must have an integer dtype; got float"),
    (np.array([6, 0, 3, 1]), r"prompt_lengths must lie in \[1, 6\] .*left-padded.*got \[6, 0, 3, 1\]"),
    (np.array([7, 1, 3, 1]), r"prompt_lengths must lie in \[1, 6\]"),
])
def test_prompt_lengths_errors_name_the_argument(lengths, match):
  model = make_model(0)
  with pytest.raises(ValueError, match=match):
    model.generate(jnp.zeros((4, PROMPT), jnp.int32), 2, prompt_lengths=lengths)
