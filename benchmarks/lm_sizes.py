"""The language-model shapes the benchmarks share: the Mamba paper's ~130M and ~1.4B Mamba LMs and
same-size Transformers (GPT-3/Pythia shapes), and a tiny one for CPU smoke runs; and the AdamW
training step that ``bench_train`` times and ``profile_step`` traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.transformer import TransformerConfig, TransformerLM
from ssmax.nn import MambaConfig, MambaLM

VOCAB = 50277  # GPT-NeoX tokenizer, as the released Mamba models; Mamba pads it to 50280

SIZES = {
    "130m": {"mamba": dict(d_model=768, n_layer=24),
             "transformer": dict(d_model=768, n_layer=12, n_head=12)},
    "1.4b": {"mamba": dict(d_model=2048, n_layer=48),
             "transformer": dict(d_model=2048, n_layer=24, n_head=16)},
    "tiny": {"mamba": dict(d_model=16, n_layer=2, d_state=4),
             "transformer": dict(d_model=16, n_layer=2, n_head=2), "vocab_size": 37},
}
MODELS = ("mamba", "transformer")


def vocab_size(size: str) -> int:
  return SIZES[size].get("vocab_size", VOCAB)


def mamba_config(size: str, **overrides) -> MambaConfig:
  """The :class:`MambaConfig` of ``size``; ``overrides`` are further config fields (dtype,
  scan_backend, sequence_axis...)."""
  return MambaConfig(vocab_size=vocab_size(size), **SIZES[size]["mamba"], **overrides)


def build(model: str, size: str, *, dtype, param_dtype=None, seed: int = 0,
          **overrides) -> nnx.Module:
  """A randomly initialised ``model`` (``"mamba"`` or ``"transformer"``) of ``size``.

  Parameters in ``param_dtype`` (default: ``dtype``). The Transformer's embedding has Mamba's
  padded vocabulary, so both heads cost the same; ``overrides`` go to the model's config
  (``scan_backend=...`` for Mamba, ``attention=...`` for the Transformer).
  """
  rngs = nnx.Rngs(seed)
  param_dtype = dtype if param_dtype is None else param_dtype
  if model == "mamba":
    return MambaLM(mamba_config(size, dtype=dtype, param_dtype=param_dtype, **overrides), rngs=rngs)
  if model == "transformer":
    vocab = MambaConfig(vocab_size=vocab_size(size)).padded_vocab_size
    return TransformerLM(TransformerConfig(vocab_size=vocab, dtype=dtype, param_dtype=param_dtype,
                                           **SIZES[size]["transformer"], **overrides), rngs=rngs)
  raise ValueError(f"model must be one of {MODELS}; got {model!r}")


def param_count(module: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def train_state(size: str, *, dtype, learning_rate: float = 3e-4, seed: int = 0, **overrides):
  """The Mamba LM of ``size`` (``dtype`` compute, float32 parameters) and its AdamW optimizer,
  split: ``(graphdef, state, parameter count)``; ``overrides`` go to the config."""
  model = build("mamba", size, dtype=dtype, param_dtype=jnp.float32, seed=seed, **overrides)
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, state, param_count(model)


def train_step_fn(graphdef):
  """A jit-compiled AdamW step on ``(model, optimizer)`` state (split by :func:`train_state`),
  donated: ``step(state, tokens, segment_ids=None) -> (loss, new state)``, next-token
  cross-entropy on ``tokens`` ``(batch, length + 1)``."""

  def step(state, tokens, segment_ids=None):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(m):
      seg = None if segment_ids is None else segment_ids[:, :-1]
      logits = m(tokens[:, :-1], segment_ids=seg).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return jax.jit(step, donate_argnums=0)
