"""Transformer LM: full forward against a float64 NumPy loop, KV-cache decode against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import transformer as tf


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _np_rotary(x, pos, base):
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    for i in range(half):
      a = pos[t] * base ** (-i / half)
      c, s = np.cos(a), np.sin(a)
      out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s
      out[t, :, i + half] = x[t, :, i + half] * c + x[t, :, i] * s
  return out


def _np_forward(model, tokens):
  """float64 loop over sequences, heads and query positions."""
  cfg = model.cfg
  p = lambda v: np.asarray(v[...], np.float64)
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  emb = p(model.embed.embedding)
  out = []
  for seq in np.asarray(tokens):
    t = len(seq)
    pos = np.arange(t)
    x = emb[seq]
    if cfg.positions == "absolute":
      x = x + p(model.pos_embed.embedding)[pos]
    for blk in model.blocks:
      h = _np_rmsnorm(x, p(blk.attn_norm.scale), cfg.norm_epsilon)
      q = (h @ p(blk.attn.q_proj.kernel)).reshape(t, cfg.n_head, cfg.head_dim)
      k = (h @ p(blk.attn.k_proj.kernel)).reshape(t, cfg.kv_heads, cfg.head_dim)
      v = (h @ p(blk.attn.v_proj.kernel)).reshape(t, cfg.kv_heads, cfg.head_dim)
      if cfg.positions == "rotary":
        q, k = _np_rotary(q, pos, cfg.rope_base), _np_rotary(k, pos, cfg.rope_base)
      y = np.zeros((t, cfg.n_head, cfg.head_dim))
      group = cfg.n_head // cfg.kv_heads
      for head in range(cfg.n_head):
        kh = head // group
        for i in range(t):
          s = k[:i + 1, kh] @ q[i, head] / np.sqrt(cfg.head_dim)
          w = np.exp(s - s.max())
          y[i, head] = (w / w.sum()) @ v[:i + 1, kh]
      x = x + y.reshape(t, -1) @ p(blk.attn.o_proj.kernel)
      h = _np_rmsnorm(x, p(blk.mlp_norm.scale), cfg.norm_epsilon)
      x = x + gelu(h @ p(blk.mlp.up.kernel)) @ p(blk.mlp.down.kernel)
    x = _np_rmsnorm(x, p(model.norm_f.scale), cfg.norm_epsilon)
    out.append(x @ emb.T if cfg.tie_embeddings else x @ p(model.lm_head.kernel))
  return np.stack(out)


@pytest.mark.parametrize("positions,n_kv_head,tie", [("rotary", None, True), ("absolute", 1, False),
                                                      ("rotary", 2, True)])
def test_forward_matches_numpy(positions, n_kv_head, tie):
  cfg = tf.TransformerConfig(vocab_size=11, d_model=12, n_layer=2, n_head=6, n_kv_head=n_kv_head,
                             d_ff=19, positions=positions, max_len=23, tie_embeddings=tie)
  model = tf.TransformerLM(cfg, rngs=nnx.Rngs(1))
  # Larger weights than the 0.02 init so attention is far from uniform.
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param) and v[...].ndim == 2:
      v[...] = v[...] * 20.0
  tokens = jax.random.randint(jax.random.key(2), (3, 17), 0, 11)
  got = np.asarray(model(tokens))
  np.testing.assert_allclose(got, _np_forward(model, tokens), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("positions", ["rotary", "absolute"])
def test_cached_decode_equals_full_forward(positions, fresh):
  cfg = tf.TransformerConfig(vocab_size=13, d_model=16, n_layer=3, n_head=4, n_kv_head=2,
                             positions=positions, max_len=29)
  model = tf.TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 21), 0, 13)
  full = np.asarray(model(tokens))
  cache = model.init_cache(2, max_len=25)
  prefix, cache = model(tokens[:, :7], cache, fresh=fresh)  # prefill
  np.testing.assert_allclose(np.asarray(prefix), full[:, :7], rtol=1e-5, atol=1e-5)
  last, _ = model(tokens[:, :7], model.init_cache(2, max_len=25), fresh=fresh, last_only=True)
  np.testing.assert_allclose(np.asarray(last), full[:, 6:7], rtol=1e-5, atol=1e-5)
  step = nnx.jit(lambda m, tok, c: m.step(tok, c))
  for t in range(7, 21):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5)
  assert int(cache.pos) == 21


def test_rejects_d_model_not_multiple_of_heads():
  with pytest.raises(ValueError, match="d_model must be a multiple of n_head=5"):
    tf.TransformerConfig(vocab_size=4, d_model=12, n_head=5)


def test_rejects_bad_kv_heads():
  with pytest.raises(ValueError, match="n_head=6 must be a multiple of n_kv_head"):
    tf.TransformerConfig(vocab_size=4, d_model=12, n_head=6, n_kv_head=4)


def test_rejects_odd_rotary_head_dim():
  with pytest.raises(ValueError, match="rotary positions need an even head dimension"):
    tf.TransformerConfig(vocab_size=4, d_model=15, n_head=5)


def test_rejects_bad_attention():
  with pytest.raises(ValueError, match="attention must be one of"):
    tf.TransformerConfig(vocab_size=4, attention="flash")


def test_rejects_bad_positions():
  with pytest.raises(ValueError, match="positions must be one of"):
    tf.TransformerConfig(vocab_size=4, positions="alibi")


def test_rejects_too_long_with_absolute_positions():
  model = tf.TransformerLM(tf.TransformerConfig(vocab_size=5, d_model=8, n_head=2, positions="absolute",
                                                max_len=6), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens length must be <= cfg.max_len=6"):
    model(jnp.zeros((1, 7), jnp.int32))


def test_rejects_cache_longer_than_position_table():
  model = tf.TransformerLM(tf.TransformerConfig(vocab_size=5, d_model=8, n_head=2, positions="absolute",
                                                max_len=6), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len must be <= cfg.max_len=6"):
    model.init_cache(1, max_len=7)


def test_rejects_float_tokens():
  model = tf.TransformerLM(tf.TransformerConfig(vocab_size=5, d_model=8, n_head=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens must have an integer dtype"):
    model(jnp.zeros((1, 3)))


def test_rejects_prefill_longer_than_cache():
  model = tf.TransformerLM(tf.TransformerConfig(vocab_size=5, d_model=8, n_head=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens length 5 exceeds the cache's max_len 4"):
    model(jnp.zeros((1, 5), jnp.int32), model.init_cache(1, 4))


def test_rejects_cache_of_other_batch():
  model = tf.TransformerLM(tf.TransformerConfig(vocab_size=5, d_model=8, n_head=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cache must hold 2 layers for batch 3"):
    model(jnp.zeros((3, 2), jnp.int32), model.init_cache(1, 4))
