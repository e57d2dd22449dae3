"""Recurrent inference: step == forward, prefill + cache, greedy generation, sampling, cache size.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmax import nn as snn
from ssmax.nn import cache as cache_lib

gen_lib = importlib.import_module("ssmax.nn.generate")  # the module (ssmax.nn.generate is the function)

TINY = dict(d_model=5, n_layer=2, vocab_size=37, d_state=3, d_conv=3)


def make_model(seed=0, **overrides):
  cfg = snn.MambaConfig(**{**TINY, **overrides})
  model = snn.MambaLM(cfg, rngs=nnx.Rngs(seed))
  # Larger weights than the init so that logits differ clearly between tokens.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))
  return model


@pytest.fixture(scope="module")
def model():
  """The default tiny model, shared by the tests that only read it (one compile per function)."""
  return make_model(7)


@jax.jit
def forward(model, tokens):
  return model(tokens)


@jax.jit
def step_all(model, tokens):
  """Feeds ``tokens`` (batch, length) one at a time through ``step``; logits (batch, length, V)."""

  def body(cache, token):
    logits, cache = model.step(cache, token)
    return cache, logits

  _, logits = jax.lax.scan(body, model.init_cache(tokens.shape[0]), tokens.T)
  return jnp.swapaxes(logits, 0, 1)


@functools.partial(jax.jit, static_argnames="split")
def prefill_then_steps(model, tokens, split):
  last, cache = model.prefill(tokens[:, :split])

  def body(cache, token):
    logits, cache = model.step(cache, token)
    return cache, logits

  _, logits = jax.lax.scan(body, cache, tokens[:, split:].T)
  return last, jnp.swapaxes(logits, 0, 1)


def tokens_for(model, shape, seed):
  return jax.random.randint(jax.random.key(seed), shape, 0, model.config.vocab_size)


@pytest.mark.parametrize("overrides", [
    None,
    dict(gated=False, scan_backend="sequential"),
    dict(scan_backend="pallas"),  # the fused scan and step kernels, interpret mode
    dict(ssm="s4d", s4d_init="lin", d_state=4),
], ids=["auto", "ungated_sequential", "pallas", "s4d"])
def test_step_logits_equal_forward_logits(model, overrides):
  if overrides is not None:
    model = make_model(1, **overrides)
  tokens = tokens_for(model, (3, 13), 2)
  full = forward(model, tokens)
  np.testing.assert_allclose(step_all(model, tokens), full, rtol=2e-4, atol=2e-5)
  # A prompt shorter than d_conv: the conv state starts partly zero.
  last, rest = prefill_then_steps(model, tokens, 2)
  np.testing.assert_allclose(last, full[:, 1], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(rest, full[:, 2:], rtol=2e-4, atol=2e-5)


@functools.partial(jax.jit, static_argnames="split")
def prefill_then_ring_steps(model, tokens, split):
  """As :func:`prefill_then_steps`, the conv states as rings (``conv_slot = t % d_conv``)."""
  _, cache = model.prefill(tokens[:, :split])

  def body(cache, xs):
    t, token = xs
    logits, cache = model.step(cache, token, conv_slot=t % model.config.d_conv)
    return cache, (logits, cache)

  n = tokens.shape[1] - split
  _, (logits, caches) = jax.lax.scan(body, cache, (jnp.arange(n, dtype=jnp.int32),
                                                   tokens[:, split:].T))
  return jnp.swapaxes(logits, 0, 1), caches


@functools.partial(jax.jit, static_argnames="split")
def prefill_then_steps_with_caches(model, tokens, split):
  _, cache = model.prefill(tokens[:, :split])

  def body(cache, token):
    logits, cache = model.step(cache, token)
    return cache, (logits, cache)

  _, (logits, caches) = jax.lax.scan(body, cache, tokens[:, split:].T)
  return jnp.swapaxes(logits, 0, 1), caches


def test_ring_conv_steps_are_bit_identical_to_shifted_steps(model):
  # 11 steps with d_conv = 3: the ring passes every slot several times; the prompt of 2 leaves the
  # first conv state partly zero.
  tokens = tokens_for(model, (3, 13), 4)
  want, want_caches = prefill_then_steps_with_caches(model, tokens, 2)
  got, got_caches = prefill_then_ring_steps(model, tokens, 2)
  np.testing.assert_array_equal(got, want)
  k = model.config.d_conv
  for layer_want, layer_got in zip(want_caches.layers, got_caches.layers):
    np.testing.assert_array_equal(layer_got.ssm, layer_want.ssm)
    for t in range(tokens.shape[1] - 2):
      # After step t the oldest input sits in slot (t + 1) % d_conv.
      np.testing.assert_array_equal(jnp.roll(layer_got.conv[t], -((t + 1) % k), axis=1),
                                    layer_want.conv[t])
      if (t + 1) % k == 0:
        np.testing.assert_array_equal(layer_got.conv[t], layer_want.conv[t])


def test_generate_updates_the_conv_states_in_place(model):
  # The decode loop of generate, compiled (on the CPU; XLA's copy insertion is the GPU's too): a
  # shifted conv state would be copied back into the loop's carry once a layer and step.
  from benchmarks import xla_offline

  prompt = tokens_for(model, (3, 5), 6)
  hlo = gen_lib._generate.lower(model, prompt, jax.random.key(0), jnp.float32(1.0), None,
                                max_new_tokens=4, greedy=True, top_k=None, top_p=None)
  hlo = hlo.compile().as_text()
  kernels = xla_offline.kernels(hlo, xla_offline.loop_body(hlo, 3))
  dims = "[" + ",".join(map(str, model.init_cache(3).layers[0].conv.shape)) + "]"
  assert kernels
  assert [k for k in kernels if k["kind"] == "copy" and k["shape"].endswith(dims)] == []


def test_forward_continues_from_a_cache(model):
  tokens = tokens_for(model, (2, 11), 4)
  _, cache = jax.jit(lambda m, t: m.prefill(t))(model, tokens[:, :4])
  logits, cache2 = jax.jit(lambda m, t, c: m(t, c, return_cache=True))(model, tokens[:, 4:], cache)
  full, cache_full = jax.jit(lambda m, t: m(t, return_cache=True))(model, tokens)
  np.testing.assert_allclose(logits, full[:, 4:], rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(cache2), jax.tree.leaves(cache_full)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def greedy_by_full_forward(model, prompt, new):
  """Greedy continuation by re-running the full model on a fixed-length buffer (causal)."""
  b, p = prompt.shape
  buf = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt)
  for t in range(p, p + new):
    logits = forward(model, buf)[:, t - 1, :model.config.vocab_size]
    buf = buf.at[:, t].set(jnp.argmax(logits, axis=-1))
  return buf


def test_greedy_generate_equals_argmax_of_full_forwards(model):
  prompt = tokens_for(model, (3, 5), 8)
  out = model.generate(prompt, 7)
  assert out.shape == (3, 12) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :5], prompt)
  np.testing.assert_array_equal(out, greedy_by_full_forward(model, prompt, 7))
  # Batched decoding equals decoding each row alone.
  np.testing.assert_array_equal(snn.generate(model, prompt[1:2], 7), out[1:2])
  np.testing.assert_array_equal(model.generate(prompt, 0), prompt)


def test_generate_never_draws_padded_vocab_ids(model):
  model = nnx.clone(model)
  prompt = tokens_for(model, (3, 5), 10)
  top = int(jnp.argmax(forward(model, prompt)[0, -1]))
  emb = model.embedding.embedding
  # Make the padding rows (37..39) far more likely than the most likely real token.
  emb[...] = emb[...].at[37:].set(100.0 * emb[...][top])
  assert int(jnp.argmax(forward(model, prompt)[0, -1])) >= 37
  out = model.generate(prompt, 7, key=jax.random.key(0), temperature=1.5)
  assert int(out.max()) < 37
  assert int(model.generate(prompt, 7).max()) < 37


def test_sampling_settings(model):
  prompt = tokens_for(model, (3, 5), 12)
  greedy = model.generate(prompt, 7)
  key = jax.random.key(13)
  top1 = model.generate(prompt, 7, key=key, temperature=0.7, top_k=1)
  np.testing.assert_array_equal(top1, greedy)
  a = model.generate(prompt, 7, key=key, temperature=1.5)
  np.testing.assert_array_equal(a, model.generate(prompt, 7, key=key, temperature=1.5))
  assert not np.array_equal(a, model.generate(prompt, 7, key=jax.random.key(14), temperature=1.5))


def test_sample_logits_distribution():
  logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.07, 0.03]))
  rows = jnp.broadcast_to(logits, (20000, 5))
  key = jax.random.key(15)

  def freq(**kw):
    draws = np.asarray(jax.jit(functools.partial(snn.sample_logits, **kw))(rows, key))
    return np.bincount(draws, minlength=5) / len(draws)

  np.testing.assert_allclose(freq(temperature=1.0), [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)
  np.testing.assert_allclose(freq(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0, 0], atol=0.015)
  # top_p=0.8 keeps the first three (0.5 + 0.25 < 0.8 <= 0.9).
  np.testing.assert_allclose(freq(temperature=1.0, top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9,
                                                                0, 0], atol=0.015)
  p2 = np.array([0.5, 0.25, 0.15, 0.07, 0.03]) ** 2
  np.testing.assert_allclose(freq(temperature=0.5), p2 / p2.sum(), atol=0.015)
  np.testing.assert_array_equal(snn.sample_logits(rows[:3], None), [0, 0, 0])


def test_cache_size_does_not_grow_with_tokens(model):
  cfg = model.config
  d_inner = cfg.d_inner
  want = cfg.n_layer * 2 * 4 * (cfg.d_conv * d_inner + d_inner * cfg.d_state)
  sizes = []
  for length in (1, 7, 40):
    _, cache = jax.eval_shape(lambda m, t: m.prefill(t), model, jnp.zeros((2, length), jnp.int32))
    sizes.append(cache_lib.nbytes(cache))
  cache = model.init_cache(2)
  assert cache_lib.nbytes(cache) == want
  for _ in range(3):
    _, cache = jax.eval_shape(lambda m, c, t: m.step(c, t), model, cache,
                              jnp.zeros((2,), jnp.int32))
    sizes.append(cache_lib.nbytes(cache))
  assert sizes == [want] * 6
  # The decode loop's carry is the cache: its shapes do not depend on max_new_tokens.
  for new in (2, 30):
    out = jax.eval_shape(functools.partial(snn.generate, max_new_tokens=new), model,
                         jnp.zeros((2, 3), jnp.int32))
    assert out.shape == (2, 3 + new)


def test_step_under_vmap_and_jit(model):
  tokens = tokens_for(model, (3, 4), 18)
  graphdef, state = nnx.split(model)

  def one(seq):  # a single sequence, batch of one inside
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(1)
    out = []
    for t in range(seq.shape[0]):
      logits, cache = m.step(cache, seq[t:t + 1])
      out.append(logits[0])
    return jnp.stack(out)

  np.testing.assert_allclose(jax.jit(jax.vmap(one))(tokens), forward(model, tokens), rtol=2e-4,
                             atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_generate_errors_name_the_argument(model):
  prompt = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="key must be a PRNG key when temperature > 0"):
    model.generate(prompt, 2, temperature=0.5)
  with pytest.raises(ValueError, match="temperature must be a float >= 0; got -1.0"):
    model.generate(prompt, 2, temperature=-1.0)
  with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]; got 0.0"):
    model.generate(prompt, 2, key=jax.random.key(0), temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="top_k must be <= vocab_size=37; got 40"):
    model.generate(prompt, 2, key=jax.random.key(0), temperature=1.0, top_k=40)
  with pytest.raises(ValueError, match="top_k must be a positive integer; got 0"):
    model.generate(prompt, 2, key=jax.random.key(0), temperature=1.0, top_k=0)
  with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer; got -1"):
    model.generate(prompt, -1)
  with pytest.raises(ValueError, match="prompt must have an integer dtype; got float32"):
    model.generate(prompt.astype(jnp.float32), 2)
  with pytest.raises(ValueError, match=r"prompt must have rank 2 \(batch, prompt_length\)"):
    model.generate(prompt[0], 2)
  with pytest.raises(ValueError, match=r"prompt must lie in \[0, 40\); got values in \[-1, 0\]"):
    model.generate(prompt.at[0, 0].set(-1), 2)


def test_step_errors_name_the_argument(model):
  cache = model.init_cache(2)
  with pytest.raises(ValueError, match=r"token must have rank 1 \(batch,\); got shape \(2, 1\)"):
    model.step(cache, jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match="token must have an integer dtype; got float32"):
    model.step(cache, jnp.zeros((2,), jnp.float32))
  with pytest.raises(ValueError, match="cache must be a MambaCache; got None"):
    model.step(None, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"state.conv must have shape \(3, 3, 10\)"):
    model.step(cache, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="cache must hold 2 layer states; got 1"):
    model.step(snn.MambaCache(cache.layers[:1]), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"conv_slot must lie in \[0, d_conv=3\); got 3"):
    model.step(cache, jnp.zeros((2,), jnp.int32), conv_slot=3)
  with pytest.raises(ValueError, match="conv_slot must be an integer scalar"):
    model.step(cache, jnp.zeros((2,), jnp.int32), conv_slot=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="conv_slot must be an integer scalar"):
    model.step(cache, jnp.zeros((2,), jnp.int32), conv_slot=1.0)
  with pytest.raises(ValueError, match="batch must be a positive integer; got 0"):
    model.init_cache(0)
