"""The language-model shapes the generation benchmarks share (no flags, so any script can import
them): the Mamba paper's ~130M and ~1.4B Mamba LMs and same-size Transformers."""

VOCAB = 50277  # GPT-NeoX tokenizer, as the released Mamba models; Mamba pads it to 50280

SIZES = {
    "130m": {"mamba": dict(d_model=768, n_layer=24),
             "transformer": dict(d_model=768, n_layer=12, n_head=12)},
    "1.4b": {"mamba": dict(d_model=2048, n_layer=48),
             "transformer": dict(d_model=2048, n_layer=24, n_head=16)},
    "tiny": {"mamba": dict(d_model=16, n_layer=2, d_state=4),
             "transformer": dict(d_model=16, n_layer=2, n_head=2), "vocab_size": 37},
}


def vocab_size(size: str) -> int:
  return SIZES[size].get("vocab_size", VOCAB)
