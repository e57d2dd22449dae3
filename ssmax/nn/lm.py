"""The Mamba language model: embedding -> Block x n_layer -> norm_f -> tied LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssmax import _checks
from ssmax.nn import init as inits
from ssmax.nn import pretrained
from ssmax.nn.block import Block
from ssmax.nn.cache import MambaCache
from ssmax.nn.config import MambaConfig
from ssmax.nn.norm import make_norm
from ssmax.scan.inputs import check_segment_ids


class MambaLM(nnx.Module):
  """Mamba language model (the official ``MambaLMHeadModel``), batch-major.

  Attributes:
    config: the :class:`MambaConfig`.
    embedding: ``nnx.Embed`` ``(padded_vocab_size, d_model)``, init normal(0.02).
    layers: ``nnx.List`` of :class:`Block`.
    norm_f: final norm.
    lm_head: ``nnx.Linear`` ``(d_model, padded_vocab_size)``, only when
      ``config.tie_embeddings`` is False; a tied head is ``embedding.attend``.

  Logits cover the padded vocabulary ``(..., padded_vocab_size)`` in ``config.dtype``, as the
  official model's; sampling in :meth:`generate` only draws from the first ``vocab_size``.
  """

  def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, MambaConfig):
      raise ValueError(f"config must be a MambaConfig; got {type(config).__name__}")
    self.config = config
    c = config
    self.embedding = nnx.Embed(c.padded_vocab_size, c.d_model,
                               embedding_init=jax.nn.initializers.normal(0.02), dtype=c.dtype,
                               param_dtype=c.param_dtype, rngs=rngs)
    self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layer)])
    self.norm_f = make_norm(c.d_model, rms_norm=c.rms_norm, eps=c.norm_epsilon,
                            param_dtype=c.param_dtype, rngs=rngs)
    if not c.tie_embeddings:
      self.lm_head = nnx.Linear(c.d_model, c.padded_vocab_size, use_bias=False,
                                kernel_init=inits.torch_uniform(c.d_model), dtype=c.dtype,
                                param_dtype=c.param_dtype, rngs=rngs)

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      scan_backend: str = "auto") -> "MambaLM":
    """Loads a ``transformers`` or ``mamba_ssm`` checkpoint directory; see
    :func:`ssmax.nn.pretrained.load_pretrained`."""
    return pretrained.load_pretrained(cls, path, dtype=dtype, param_dtype=param_dtype,
                                      scan_backend=scan_backend)

  def save_pretrained(self, path):
    """Writes the ``transformers`` format; see :func:`ssmax.nn.pretrained.save_pretrained`."""
    return pretrained.save_pretrained(self, path)

  @property
  def residual_dtype(self):
    return jnp.float32 if self.config.residual_in_fp32 else self.config.dtype

  # --------------------------------------------------------------------------------------------

  def __call__(self, tokens: jax.Array, cache: MambaCache | None = None, *,
               return_cache: bool = False, segment_ids: jax.Array | None = None):
    """Parallel forward over a sequence.

    Args:
      tokens: ``(batch, length)`` integer token ids in ``[0, padded_vocab_size)``, ``length >= 1``.
      cache: optional :class:`MambaCache` to continue from (e.g. a previous prefill).
      return_cache: also return the cache after the last token.
      segment_ids: optional ``(batch, length)`` integer ids of packed documents: a new document
        starts wherever the id changes, and every document's logits equal those of running it
        alone (no convolution input or SSM state crosses a boundary; see
        :meth:`MambaMixer.__call__`). ``cache`` continues each row's first document; the returned
        cache is that after its last document.

    Returns:
      logits ``(batch, length, padded_vocab_size)``, or ``(logits, cache)``.
    """
    self._check_tokens("tokens", tokens, 2, "(batch, length)")
    cache = self._check_cache(cache, tokens.shape[0])
    self._check_segment_ids(segment_ids, tokens.shape)
    h, cache = self._hidden(tokens, cache, return_cache, segment_ids)
    logits = self._head(h)
    return (logits, cache) if return_cache else logits

  def init_cache(self, batch: int) -> MambaCache:
    """Zero cache for ``batch`` sequences (the state before any token)."""
    _checks.positive_int("batch", batch)
    return MambaCache(tuple(layer.mixer.init_state(batch) for layer in self.layers))

  def prefill(self, tokens: jax.Array, cache: MambaCache | None = None, *,
              segment_ids: jax.Array | None = None):
    """Reads a prompt with the parallel scan and returns what decoding needs.

    Args:
      tokens: ``(batch, length)`` integer prompt.
      cache: optional cache to continue from; zero state if None.
      segment_ids: optional ``(batch, length)`` packed documents (see :meth:`__call__`); the
        cache returned is that of each row's last document. Left-padded prompts of different
        lengths are a padding document followed by the prompt.

    Returns:
      ``(logits, cache)``: logits of the last position ``(batch, padded_vocab_size)`` and the
      :class:`MambaCache` (conv inputs and SSM state of every layer) after the prompt.
    """
    self._check_tokens("tokens", tokens, 2, "(batch, length)")
    cache = self._check_cache(cache, tokens.shape[0])
    self._check_segment_ids(segment_ids, tokens.shape)
    h, cache = self._hidden(tokens, cache, True, segment_ids)
    return self._head(h[:, -1]), cache

  def step(self, cache: MambaCache, token: jax.Array, *, conv_slot=None):
    """Reads one token per sequence; O(1) in the number of tokens read before.

    Args:
      cache: :class:`MambaCache` for ``batch`` sequences.
      token: ``(batch,)`` integer token ids.
      conv_slot: None, or the conv states' ring slot (int32 scalar in ``[0, d_conv)``): a decode
        loop passes ``t % d_conv`` at its ``t``-th step so that every layer updates its conv state
        in place (:meth:`MambaMixer.step`). The cache returned is then in the default layout only
        when ``(t + 1) % d_conv == 0``.

    Returns:
      ``(logits, cache)`` with logits ``(batch, padded_vocab_size)``.
    """
    self._check_tokens("token", token, 1, "(batch,)")
    cache = self._check_cache(cache, token.shape[0], required=True)
    x = self.embedding(token).astype(self.residual_dtype)
    states = []
    for layer, state in zip(self.layers, cache.layers):
      x, state = layer.step(state, x, conv_slot=conv_slot)
      states.append(state)
    return self._head(self.norm_f(x)), MambaCache(tuple(states))

  def generate(self, prompt: jax.Array, max_new_tokens: int, *, key: jax.Array | None = None,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, prompt_lengths: jax.Array | None = None) -> jax.Array:
    """Continues ``prompt`` by ``max_new_tokens`` tokens; see :func:`ssmax.nn.generate`
    (``prompt_lengths``: left-padded prompts of different lengths)."""
    from ssmax.nn.generate import generate

    return generate(self, prompt, max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                    top_p=top_p, prompt_lengths=prompt_lengths)

  # --------------------------------------------------------------------------------------------

  def _hidden(self, tokens, cache, return_cache, segment_ids=None):
    x = self.embedding(tokens).astype(self.residual_dtype)
    states = []
    for i, layer in enumerate(self.layers):
      state = None if cache is None else cache.layers[i]
      if return_cache:
        x, state = layer(x, state, return_state=True, segment_ids=segment_ids)
        states.append(state)
      else:
        x = layer(x, state, segment_ids=segment_ids)
    return self.norm_f(x), (MambaCache(tuple(states)) if return_cache else None)

  def _head(self, h):
    h = h.astype(self.config.dtype)
    if self.config.tie_embeddings:
      return self.embedding.attend(h)
    return self.lm_head(h)

  def _check_tokens(self, name, tokens, ndim, what):
    _checks.rank(name, tokens, ndim, what)
    dtype = _checks.dtype_of(tokens)
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must have an integer dtype; got {dtype}")
    if ndim == 2 and tokens.shape[1] < 1:
      raise ValueError(f"{name} must have length >= 1 along axis 1; got shape {tokens.shape}")
    if not isinstance(tokens, jax.core.Tracer):
      # Concrete ids can be range-checked here; an out-of-range id would embed as NaN.
      ids = np.asarray(tokens)
      vocab = self.config.padded_vocab_size
      if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}); got values in "
                         f"[{ids.min()}, {ids.max()}]")

  def _check_segment_ids(self, segment_ids, shape):
    if segment_ids is not None:
      check_segment_ids(segment_ids, tuple(shape), like="tokens")

  def _check_cache(self, cache, batch, required=False):
    if cache is None:
      if required:
        raise ValueError("cache must be a MambaCache; got None (use init_cache or prefill)")
      return None
    if not isinstance(cache, MambaCache):
      raise ValueError(f"cache must be a MambaCache; got {type(cache).__name__}")
    if len(cache.layers) != len(self.layers):
      raise ValueError(f"cache must hold {len(self.layers)} layer states; got {len(cache.layers)}")
    return cache
