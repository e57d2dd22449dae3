"""Recurrent generation: prefill the prompt with the parallel scan, then decode token by token.

Prompts of different lengths are batched left-padded, with ``prompt_lengths``: the prefill reads
the padding as a document of its own (``segment_ids``), so every row decodes as if alone.

Each decode step costs O(1) in the sequence length: every layer shifts its conv state by one
input and applies one selective-state update (:meth:`MambaMixer.step`). The whole loop is one
``jax.jit``-compiled ``lax.scan`` over the new tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssmax import _checks


def sample_logits(logits: jax.Array, key: jax.Array | None, *, temperature: float | jax.Array = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  vocab_size: int | None = None) -> jax.Array:
  """Draws one token per row of ``logits``.

  Args:
    logits: ``(batch, vocab)`` floating.
    key: PRNG key; unused (may be None) at ``temperature == 0``.
    temperature: 0 is greedy (argmax, ties to the lowest id); > 0 samples from
      ``softmax(logits / temperature)``.
    top_k: keep only the ``top_k`` largest logits before sampling.
    top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
    vocab_size: draw only from the first ``vocab_size`` ids (the real vocabulary of a model whose
      logits cover a padded one, ``config.vocab_size``); default all of them.

  Returns:
    ``(batch,)`` int32 token ids in ``[0, vocab_size)``. ``top_k`` and ``top_p`` only matter when
    sampling.
  """
  if vocab_size is not None:
    vocab_size = _checks.positive_int("vocab_size", vocab_size)
    logits = logits[..., :vocab_size]  # the padded rows are never drawn
  logits = logits.astype(jnp.float32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the tokens more likely than it have not yet reached top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model, prompt: jax.Array, max_new_tokens: int, *, key: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, prompt_lengths: jax.Array | None = None) -> jax.Array:
  """Continues ``prompt`` with a :class:`~ssmax.nn.MambaLM`, jit-compiled.

  Prompts of different lengths go in one batch *left-padded*: row ``b`` holds its
  ``prompt_lengths[b]`` tokens at the end, ``prompt[b, P - prompt_lengths[b]:]``, after any
  padding ids (any valid id, e.g. 0). The prefill reads the padding as a separate document
  (``segment_ids``), so nothing of it reaches the prompt: each row's continuation is the one that
  generating its prompt alone gives (greedy: the same tokens, up to float rounding).

  Args:
    model: a :class:`~ssmax.nn.MambaLM`.
    prompt: ``(batch, prompt_length)`` integer token ids, ``prompt_length >= 1``.
    max_new_tokens: number of tokens to append, ``>= 0``.
    key: PRNG key, required when ``temperature > 0``.
    temperature: 0 (default) is greedy decoding; ``top_k`` and ``top_p`` then have no effect.
    top_k: optional positive int, at most ``vocab_size``.
    top_p: optional float in ``(0, 1]``.
    prompt_lengths: optional ``(batch,)`` integers in ``[1, prompt_length]``: the length of each
      left-padded prompt; None means every row is ``prompt_length`` long.

  Returns:
    ``(batch, prompt_length + max_new_tokens)`` int32: the (padded) prompt followed by the new
    tokens, all drawn from the first ``config.vocab_size`` ids.
  """
  _checks.rank("prompt", prompt, 2, "(batch, prompt_length)")
  if not jnp.issubdtype(_checks.dtype_of(prompt), jnp.integer):
    raise ValueError(f"prompt must have an integer dtype; got {_checks.dtype_of(prompt)}")
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
      or max_new_tokens < 0):
    raise ValueError(f"max_new_tokens must be a non-negative integer; got {max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      temperature >= 0):
    raise ValueError(f"temperature must be a float >= 0; got {temperature!r}")
  greedy = temperature == 0
  if not greedy and key is None:
    raise ValueError(f"key must be a PRNG key when temperature > 0; got None "
                     f"(temperature={temperature})")
  vocab = model.config.vocab_size
  if top_k is not None:
    _checks.positive_int("top_k", top_k)
    if top_k > vocab:
      raise ValueError(f"top_k must be <= vocab_size={vocab}; got {top_k}")
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                            or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be a float in (0, 1]; got {top_p!r}")
  prompt = jnp.asarray(prompt, jnp.int32)
  model._check_tokens("prompt", prompt, 2, "(batch, prompt_length)")
  if prompt_lengths is not None:
    prompt_lengths = _check_prompt_lengths(prompt_lengths, prompt.shape)
  if max_new_tokens == 0:
    return prompt
  if greedy:
    key = jax.random.key(0)  # threaded through the loop, never used
  # The model goes in as the pytree it is: 1.3 / 2.5 ms of host time a call at 130M / 1.4B, where
  # nnx.split's graph walk took 11 / 25 ms, serial with the GPU (2-core CPU; results/bench_generate/
  # 2026-12-04_h200_pytree/host_overhead.py).
  return _generate(model, prompt, key, jnp.float32(temperature if not greedy else 1.0),
                   prompt_lengths, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                   top_p=None if top_p is None else float(top_p))


def _check_prompt_lengths(prompt_lengths, shape):
  b, p = shape
  if isinstance(prompt_lengths, (list, tuple)):
    prompt_lengths = np.asarray(prompt_lengths)
  _checks.shape("prompt_lengths", prompt_lengths, (b,), "(batch,), one length per prompt row")
  dtype = _checks.dtype_of(prompt_lengths)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"prompt_lengths must have an integer dtype; got {dtype}")
  if not isinstance(prompt_lengths, jax.core.Tracer):
    lengths = np.asarray(prompt_lengths)
    if lengths.size and (lengths.min() < 1 or lengths.max() > p):
      raise ValueError(f"prompt_lengths must lie in [1, {p}] (the prompt's length; prompts are "
                       f"left-padded); got {lengths.tolist()}")
  return jnp.asarray(prompt_lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k", "top_p"))
def _generate(model, prompt, key, temperature, prompt_lengths, *, max_new_tokens, greedy, top_k,
              top_p):
  vocab = model.config.vocab_size

  def sample(logits, k):
    # Padded vocabulary rows are never drawn.
    return sample_logits(logits, k, temperature=0.0 if greedy else temperature, top_k=top_k,
                         top_p=top_p, vocab_size=vocab)

  keys = jax.random.split(key, max_new_tokens)
  segment_ids = None
  if prompt_lengths is not None:  # left padding: document 0, the prompt: document 1
    p = prompt.shape[1]
    segment_ids = (jnp.arange(p)[None, :] >= p - prompt_lengths[:, None]).astype(jnp.int32)
  logits, cache = model.prefill(prompt, segment_ids=segment_ids)
  first = sample(logits, keys[0])

  d_conv = model.config.d_conv

  def body(carry, k):
    cache, token, t = carry
    # The conv states as rings, updated in place; the cache is dropped after the loop.
    logits, cache = model.step(cache, token, conv_slot=t % d_conv)
    token = sample(logits, k)
    return (cache, token, t + 1), token

  _, rest = lax.scan(body, (cache, first, jnp.int32(0)), keys[1:])
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
