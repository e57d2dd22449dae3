"""A pre-norm Transformer language model in Flax NNX, with a KV cache for generation.

The attention baseline of the Induction Heads experiment (the paper's "MHA-Abs" and "MHA-RoPE"),
written so that the same module serves a generation benchmark at GPT-like shapes: multi-head (or
grouped-query) causal attention with rotary or learned absolute positions, a GELU MLP, RMSNorm before
each sublayer and before the head, and a KV cache (:meth:`TransformerLM.init_cache`,
:meth:`TransformerLM.step`) whose decode logits equal the full forward's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ssmax import _checks
from ssmax.nn.dense import dense

POSITIONS = ("rotary", "absolute")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of a :class:`TransformerLM`.

  Attributes:
    vocab_size: number of tokens.
    d_model: width of the residual stream.
    n_layer: number of blocks.
    n_head: query heads; ``d_model`` must be a multiple.
    n_kv_head: key/value heads (grouped-query attention); ``None`` means ``n_head``.
    d_ff: hidden width of the MLP; ``None`` means ``4 * d_model``.
    positions: ``"rotary"`` (RoPE on queries and keys) or ``"absolute"`` (a learned table added to the
      embedding; lengths past ``max_len`` are then rejected).
    max_len: rows of the absolute position table; with rotary positions only a default cache size.
    rope_base: RoPE frequency base.
    norm_epsilon: RMSNorm epsilon.
    tie_embeddings: the head is the transposed token embedding.
    attention: implementation of the causal attention over a sequence's own keys (training, and a
      prefill into an empty cache), passed to ``jax.nn.dot_product_attention``: ``"xla"`` (runs
      everywhere; materialises the scores) or ``"cudnn"`` (fused flash attention; GPU, bfloat16 or
      float16 only). Decode steps attend to the cache with ``"xla"``.
    dtype: compute dtype of activations (attention softmax runs in float32).
    param_dtype: dtype of the parameters.
  """

  vocab_size: int
  d_model: int = 64
  n_layer: int = 2
  n_head: int = 8
  n_kv_head: int | None = None
  d_ff: int | None = None
  positions: str = "rotary"
  max_len: int = 2048
  rope_base: float = 10000.0
  norm_epsilon: float = 1e-5
  tie_embeddings: bool = True
  attention: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_len"):
      _checks.positive_int(name, getattr(self, name))
    if self.n_kv_head is not None:
      _checks.positive_int("n_kv_head", self.n_kv_head)
    if self.d_ff is not None:
      _checks.positive_int("d_ff", self.d_ff)
    _checks.one_of("positions", self.positions, POSITIONS)
    _checks.one_of("attention", self.attention, ("xla", "cudnn"))
    if self.d_model % self.n_head:
      raise ValueError(f"d_model must be a multiple of n_head={self.n_head}; got {self.d_model}")
    if self.n_head % self.kv_heads:
      raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head; got {self.n_kv_head}")
    if self.positions == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head dimension; got d_model / n_head = {self.head_dim}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_head if self.n_kv_head is None else self.n_kv_head

  @property
  def ff_width(self) -> int:
    return 4 * self.d_model if self.d_ff is None else self.d_ff


class LayerCache(NamedTuple):
  """Keys and values of one layer, ``(batch, max_len, kv_heads, head_dim)``."""

  k: jax.Array
  v: jax.Array


class Cache(NamedTuple):
  """KV cache of a :class:`TransformerLM`: one :class:`LayerCache` per layer and the fill level."""

  layers: tuple[LayerCache, ...]
  pos: jax.Array  # int32 scalar: number of positions already written


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """RoPE (Su et al., 2021), rotate-half form: ``x`` ``(batch, length, heads, head_dim)``.

  Channel ``i < head_dim/2`` pairs with ``i + head_dim/2`` and the pair turns by angle
  ``position * base**(-2i/head_dim)``. ``positions`` is ``(length,)`` int32. Computed in float32.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * freq  # (length, half)
  cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dense(cfg: TransformerConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(std),
                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head (grouped-query) self-attention, optionally reading and writing a KV cache."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, hd = cfg.d_model, cfg.head_dim
    out_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections scaled by depth
    self.q_proj = _dense(cfg, d, cfg.n_head * hd, 0.02, rngs)
    self.k_proj = _dense(cfg, d, cfg.kv_heads * hd, 0.02, rngs)
    self.v_proj = _dense(cfg, d, cfg.kv_heads * hd, 0.02, rngs)
    self.o_proj = _dense(cfg, cfg.n_head * hd, d, out_std, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None,
               start: jax.Array | None = None, fresh: bool = False):
    """``x`` ``(batch, length, d_model)`` at ``positions`` ``(length,)``; with a cache, writes this
    chunk's keys and values at ``start`` and attends to every cached position up to its own.
    ``fresh``: the cache is empty and ``start`` is 0, so the chunk attends only to itself."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = dense(self.q_proj, x).reshape(b, t, cfg.n_head, cfg.head_dim)
    k = dense(self.k_proj, x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    v = dense(self.v_proj, x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    if cfg.positions == "rotary":
      q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)
    if cache is None or fresh:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
    if cache is not None:
      k_all = lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
      v_all = lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
      if not fresh:
        visible = positions[:, None] >= jnp.arange(k_all.shape[1])[None, :]  # (t, max_len)
        y = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                         mask=visible[None, None])
      cache = LayerCache(k_all, v_all)
    return dense(self.o_proj, y.reshape(b, t, cfg.n_head * cfg.head_dim)), cache


class MLP(nnx.Module):
  """``Linear -> GELU -> Linear``."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.up = _dense(cfg, cfg.d_model, cfg.ff_width, 0.02, rngs)
    self.down = _dense(cfg, cfg.ff_width, cfg.d_model, 0.02 / math.sqrt(2 * cfg.n_layer), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.down, jax.nn.gelu(dense(self.up, x)))


class TransformerBlock(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(epsilon=cfg.norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(cfg.d_model, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, **kw)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, cache=None, start=None, fresh=False):
    h, cache = self.attn(self.attn_norm(x), positions, cache, start, fresh)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class TransformerLM(nnx.Module):
  """Token embedding, ``n_layer`` pre-norm blocks, final RMSNorm, LM head.

  ``model(tokens)`` with ``tokens`` ``(batch, length)`` int returns logits
  ``(batch, length, vocab_size)`` in ``cfg.dtype``. ``model(tokens, cache)`` continues a cached
  sequence (prefill when the cache is empty, decode one token at a time with :meth:`step`) and
  returns ``(logits, cache)``.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(0.02),
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.positions == "absolute":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.02),
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.norm_f = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_epsilon, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.d_model, cfg.vocab_size, 0.02, rngs)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` (default ``cfg.max_len``) tokens;
    keys and values ``(batch, max_len, kv_heads, head_dim)`` in ``dtype`` (default ``cfg.dtype``)."""
    cfg = self.cfg
    _checks.positive_int("batch", batch)
    max_len = cfg.max_len if max_len is None else _checks.positive_int("max_len", max_len)
    if cfg.positions == "absolute" and max_len > cfg.max_len:
      raise ValueError(f"max_len must be <= cfg.max_len={cfg.max_len} with absolute positions; got {max_len}")
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    dtype = cfg.dtype if dtype is None else dtype
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer))
    return Cache(layers, jnp.zeros((), jnp.int32))

  def __call__(self, tokens: jax.Array, cache: Cache | None = None, *, fresh: bool = False,
               last_only: bool = False):
    """Logits ``(batch, length, vocab_size)``, and the updated cache when one is given.

    ``fresh=True`` promises that ``cache`` is empty (a prefill): attention then runs over the
    prompt's own keys, causally, with ``cfg.attention``, instead of over the whole masked cache.
    ``last_only=True`` applies the head to the last position alone (logits ``(batch, 1, vocab)``):
    a prefill needs no more, and every position's logits at batch 128 and length 2048 would take
    26 GB.
    """
    cfg = self.cfg
    _checks.rank("tokens", tokens, 2, "(batch, length)")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must have an integer dtype; got {tokens.dtype}")
    b, t = tokens.shape
    if cache is not None:
      if len(cache.layers) != cfg.n_layer or cache.layers[0].k.shape[0] != b:
        raise ValueError(f"cache must hold {cfg.n_layer} layers for batch {b}; got {len(cache.layers)} "
                         f"layers of shape {cache.layers[0].k.shape}")
      if t > cache.layers[0].k.shape[1]:
        raise ValueError(f"tokens length {t} exceeds the cache's max_len {cache.layers[0].k.shape[1]}")
    elif cfg.positions == "absolute" and t > cfg.max_len:
      raise ValueError(f"tokens length must be <= cfg.max_len={cfg.max_len} with absolute positions; got {t}")
    start = jnp.zeros((), jnp.int32) if cache is None else cache.pos
    positions = start + jnp.arange(t, dtype=jnp.int32)
    x = self.embed(tokens)
    if cfg.positions == "absolute":
      x = x + self.pos_embed(positions)[None]
    new_layers = []
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, positions, None if cache is None else cache.layers[i], start,
                             fresh and cache is not None)
      new_layers.append(layer_cache)
    x = self.norm_f(x[:, -1:] if last_only else x)
    logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
    if cache is None:
      return logits
    return logits, Cache(tuple(new_layers), cache.pos + t)

  def step(self, tokens: jax.Array, cache: Cache):
    """Decodes one token per sequence: ``tokens`` ``(batch,)`` -> logits ``(batch, vocab_size)``."""
    _checks.rank("tokens", tokens, 1, "(batch,)")
    logits, cache = self(tokens[:, None], cache)
    return logits[:, 0], cache


def generate(model: TransformerLM, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
  """Greedy continuation with a KV cache sized for prompt + new tokens: ``prompt`` ``(batch,
  length)`` int -> ``(batch, length + max_new_tokens)`` int32. Prefill over the prompt (the head
  on its last position only), then a jit-compiled loop of one-token steps."""
  # The model goes in as a pytree, as in ssmax.nn.generate (no nnx.split graph walk per call).
  return _generate(model, jnp.asarray(prompt, jnp.int32), max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _generate(model, prompt, *, max_new_tokens):
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + max_new_tokens)
  logits, cache = model(prompt, cache, fresh=True, last_only=True)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def body(carry, _):
    cache, token = carry
    logits, cache = model.step(token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (cache, token), token

  _, rest = lax.scan(body, (cache, first), None, length=max_new_tokens - 1)
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
