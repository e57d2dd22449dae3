"""Checkpoint interop against PyTorch: ``transformers``' MambaForCausalLM is the independent oracle.

PyTorch, transformers and safetensors are test dependencies; without them these tests fail (by
design, they do not skip).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from ssmax.nn import pretrained
from ssmax.nn import MambaConfig, MambaLM

VOCAB = 37  # padded to 40 by ssmax's default multiple of 8
PADDED = 40
PROMPT_LEN = 11
NEW_TOKENS = 7


def _torch_model(seed, **kw):
  """A tiny MambaForCausalLM with every parameter random (so a mis-mapped tensor shows)."""
  torch.manual_seed(seed)
  cfg = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, state_size=5,
             eos_token_id=None, bos_token_id=None, pad_token_id=None)  # greedy runs to the end
  cfg.update(kw)
  model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1.0 + 0.3 * noise if "norm" in name else (0.4 if p.ndim > 1 else 0.5) * noise)
  return model


def _prompt(seed, batch=3):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, PROMPT_LEN))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.double().numpy()


def _torch_greedy(model, tokens):
  with torch.no_grad():
    return model.generate(torch.as_tensor(tokens), max_new_tokens=NEW_TOKENS,
                          do_sample=False).numpy()


def _rel_err(got, want):
  return np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _check_against_torch(ours, model, seed, greedy=True):
  tokens = _prompt(seed)
  want = _torch_logits(model, tokens)
  got = np.asarray(_logits(ours, jnp.asarray(tokens)))
  assert got.shape == (3, PROMPT_LEN, PADDED)
  assert _rel_err(got[..., :VOCAB], want) < 1e-4
  if greedy:
    np.testing.assert_array_equal(np.asarray(ours.generate(jnp.asarray(tokens), NEW_TOKENS)),
                                  _torch_greedy(model, tokens))


def _write_mamba_ssm(model, path, *, extra_rows, fmt="bin"):
  """Writes ``model`` as mamba_ssm's ``MambaLMHeadModel.save_pretrained`` would: its config dict
  and state dict (embedding already padded to a multiple of 8; tied lm_head kept as a copy)."""
  c = model.config
  rng = np.random.default_rng(7)
  state = {}
  for name, t in model.state_dict().items():
    name = name.replace("backbone.embeddings.", "backbone.embedding.")
    if name in ("backbone.embedding.weight", "lm_head.weight") and extra_rows:
      pad = torch.as_tensor(rng.normal(size=(extra_rows, t.shape[1])), dtype=t.dtype)
      t = torch.cat([t, pad])
    state[name] = t.clone()
  if c.tie_word_embeddings:
    state["lm_head.weight"] = state["backbone.embedding.weight"]
  config = {
      "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
      "vocab_size": VOCAB,
      "ssm_cfg": {"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel,
                  "expand": c.expand, "dt_rank": c.time_step_rank, "bias": c.use_bias,
                  "conv_bias": c.use_conv_bias},
      "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
      "fused_add_norm": True, "pad_vocab_size_multiple": 8,
      "tie_embeddings": c.tie_word_embeddings,
  }
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  if fmt == "bin":
    torch.save(state, path / "pytorch_model.bin")
  else:
    safetensors.numpy.save_file({k: v.numpy() for k, v in state.items() if k != "lm_head.weight"
                                 or not c.tie_word_embeddings}, path / "model.safetensors")
  return state


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  model = _torch_model(0)
  path = tmp_path_factory.mktemp("hf_tied")
  model.save_pretrained(path)
  return model, path


# ----------------------------------------------------------------------------------------------
# Loading.


def test_transformers_tied_logits_and_greedy(tied):
  model, path = tied
  ours = MambaLM.from_pretrained(path)
  assert ours.config.vocab_size == VOCAB and ours.config.tie_embeddings
  assert not hasattr(ours, "lm_head")
  # Rows added by the padding are zeros.
  np.testing.assert_array_equal(np.asarray(ours.embedding.embedding[...])[VOCAB:], 0.0)
  _check_against_torch(ours, model, seed=1)


def test_transformers_untied_with_biases_sharded_logits(tmp_path):
  model = _torch_model(2, tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                       conv_kernel=3, expand=3, time_step_rank=3, layer_norm_epsilon=1e-3)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  ours = MambaLM.from_pretrained(tmp_path)
  c = ours.config
  assert (c.tie_embeddings, c.bias, c.conv_bias, c.d_conv, c.expand, c.dt_rank,
          c.norm_epsilon) == (False, True, False, 3, 3, 3, 1e-3)
  _check_against_torch(ours, model, seed=3, greedy=False)


def test_mamba_ssm_bin_tied_padded_vocab_logits_and_greedy(tied, tmp_path):
  model, _ = tied
  state = _write_mamba_ssm(model, tmp_path / "mamba_ssm", extra_rows=PADDED - VOCAB)
  ours = MambaLM.from_pretrained(tmp_path / "mamba_ssm")
  # The checkpoint's own padding rows are kept.
  np.testing.assert_array_equal(np.asarray(ours.embedding.embedding[...]),
                                state["backbone.embedding.weight"].numpy())
  _check_against_torch(ours, model, seed=4)


def test_mamba_ssm_untied_safetensors_logits_and_greedy(tmp_path):
  model = _torch_model(5, tie_word_embeddings=False, use_bias=True, conv_kernel=5, expand=1,
                       time_step_rank=4)
  _write_mamba_ssm(model, tmp_path / "mamba_ssm", extra_rows=0, fmt="safetensors")
  ours = MambaLM.from_pretrained(tmp_path / "mamba_ssm")
  assert (ours.config.d_conv, ours.config.expand, ours.config.dt_rank) == (5, 1, 4)
  _check_against_torch(ours, model, seed=6)


def test_bfloat16_safetensors_load_exactly(tmp_path):
  model = _torch_model(8).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  ours = MambaLM.from_pretrained(tmp_path)
  state = model.state_dict()
  for layer in range(2):
    prefix = f"backbone.layers.{layer}.mixer."
    got = ours.layers[layer].mixer
    np.testing.assert_array_equal(np.asarray(got.in_proj.kernel[...]),
                                  state[prefix + "in_proj.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(got.conv1d.kernel[...])[:, 0, :],
                                  state[prefix + "conv1d.weight"].float().numpy()[:, 0, :].T)
    np.testing.assert_array_equal(np.asarray(got.A_log[...]),
                                  state[prefix + "A_log"].float().numpy())
  assert ours.embedding.embedding[...].dtype == jnp.float32


def test_official_130m_config():
  # config.json of the published state-spaces/mamba-130m checkpoint.
  cfg = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
         "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
  c = pretrained.config_from_dict(cfg)
  assert (c.d_model, c.n_layer, c.vocab_size, c.padded_vocab_size, c.d_state, c.d_conv,
          c.expand, c.resolved_dt_rank, c.tie_embeddings) == (768, 24, 50277, 50280, 16, 4, 2,
                                                             48, True)


# ----------------------------------------------------------------------------------------------
# Writing.


def _random_model(seed, **kw):
  """A MambaLM with every parameter random (the init's ones, zeros and constant A_log would hide
  mapping errors)."""
  cfg = dict(d_model=24, n_layer=2, vocab_size=VOCAB, d_state=5, d_conv=3, dt_rank=3)
  cfg.update(kw)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MambaLM(MambaConfig(**cfg),
                                                             rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(0.4 * rng.normal(size=x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, tie):
  ours = _random_model(9, tie_embeddings=tie, bias=not tie)
  ours.save_pretrained(tmp_path)
  theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
  assert theirs.config.vocab_size == PADDED
  tokens = _prompt(10)
  want = _torch_logits(theirs, tokens)
  assert _rel_err(np.asarray(_logits(ours, jnp.asarray(tokens))), want) < 1e-4

  again = MambaLM.from_pretrained(tmp_path)
  assert again.config.padded_vocab_size == PADDED and again.config.tie_embeddings == tie
  assert again.config.vocab_size == VOCAB  # the real vocabulary survives (issue 18, defect 7)
  flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  a, b = flat(ours), flat(again)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path].get_value()), np.asarray(b[path].get_value()))


def test_save_pretrained_round_trip_samples_only_real_tokens(tmp_path):
  """Issue 18, defect 7: the reloaded model's vocab_size was the padded one, so sampling at
  temperature 1 drew ids >= the real vocabulary."""
  ours = _random_model(12, n_layer=1)
  ours.save_pretrained(tmp_path)
  again = MambaLM.from_pretrained(tmp_path)
  assert again.config == ours.config
  prompt = jnp.asarray(_prompt(13, batch=8)[:, :3])
  out = np.asarray(again.generate(prompt, 25, key=jax.random.key(0), temperature=1.0))
  assert out.shape == (8, 28) and out.min() >= 0 and out.max() < VOCAB


def test_save_pretrained_bfloat16(tmp_path):
  ours = _random_model(11, n_layer=1, param_dtype=jnp.bfloat16)
  pretrained.save_pretrained(ours, tmp_path)
  theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path)
  got = theirs.backbone.layers[0].mixer.x_proj.weight.detach()
  assert got.dtype == torch.bfloat16
  np.testing.assert_array_equal(got.float().numpy().T,
                                np.asarray(ours.layers[0].mixer.x_proj.kernel[...], np.float32))
  again = MambaLM.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(again.embedding.embedding[...]),
                                np.asarray(ours.embedding.embedding[...]))


def test_save_pretrained_rejects_non_model(tmp_path):
  with pytest.raises(ValueError, match="model must be a MambaLM; got dict"):
    pretrained.save_pretrained({}, tmp_path)


def test_save_pretrained_rejects_layernorm(tmp_path):
  config = MambaConfig(d_model=8, n_layer=1, vocab_size=VOCAB, rms_norm=False)
  ours = nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))  # fails before any array
  with pytest.raises(ValueError, match=r"needs config.rms_norm == True; got False"):
    pretrained.save_pretrained(ours, tmp_path)


# ----------------------------------------------------------------------------------------------
# Errors: each names what is wrong.


def _edited(tied, tmp_path, edit):
  _, src = tied
  tensors = dict(safetensors.numpy.load_file(src / "model.safetensors"))
  edit(tensors)
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "config.json").write_text((src / "config.json").read_text())
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  return tmp_path


def test_error_missing_tensor(tied, tmp_path):
  path = _edited(tied, tmp_path, lambda t: t.pop("backbone.layers.1.mixer.D"))
  with pytest.raises(ValueError, match=r"missing tensors \['backbone.layers.1.mixer.D'\]"):
    MambaLM.from_pretrained(path)


def test_error_missing_untied_head(tied, tmp_path):
  path = _edited(tied, tmp_path, lambda t: None)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
  with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
    MambaLM.from_pretrained(path)


def test_error_unexpected_tensor(tied, tmp_path):
  def edit(t):
    t["backbone.layers.2.mixer.D"] = t["backbone.layers.1.mixer.D"]
  path = _edited(tied, tmp_path, edit)
  with pytest.raises(ValueError, match=r"unexpected tensors \['backbone.layers.2.mixer.D'\]"):
    MambaLM.from_pretrained(path)


def test_error_mismatched_shape(tied, tmp_path):
  def edit(t):
    t["backbone.layers.0.mixer.A_log"] = np.zeros((48, 6), np.float32)
  path = _edited(tied, tmp_path, edit)
  with pytest.raises(ValueError, match=r"mismatched shapes \[backbone.layers.0.mixer.A_log: "
                     r"stored \(48, 6\), expected \(48, 5\)\]"):
    MambaLM.from_pretrained(path)


def test_error_vocab_rows_beyond_padding(tied, tmp_path):
  def edit(t):
    t["backbone.embeddings.weight"] = np.zeros((PADDED + 1, 24), np.float32)
  path = _edited(tied, tmp_path, edit)
  with pytest.raises(ValueError, match=r"backbone.embeddings.weight: stored \(41, 24\), "
                     r"expected \(37..40, 24\)"):
    MambaLM.from_pretrained(path)


def test_error_tied_head_differs(tied, tmp_path):
  def edit(t):
    t["lm_head.weight"] = t["backbone.embeddings.weight"] + 1.0
  path = _edited(tied, tmp_path, edit)
  with pytest.raises(ValueError, match="lm_head.weight: differs from the embedding, but the "
                     "config ties them"):
    MambaLM.from_pretrained(path)


def test_error_both_naming_schemes(tied, tmp_path):
  def edit(t):
    t["backbone.embedding.weight"] = t["backbone.embeddings.weight"]
  path = _edited(tied, tmp_path, edit)
  with pytest.raises(ValueError, match="stored twice"):
    MambaLM.from_pretrained(path)


@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "mamba2", "hidden_size": 8}, "model_type must be 'mamba'; got 'mamba2'"),
    ({"d_model": 8, "n_layer": 1, "vocab_size": 9, "ssm_cfg": {"layer": "Mamba2"}},
     "ssm_cfg.layer must be 'Mamba1'; got 'Mamba2'"),
    ({"d_model": 8, "n_layer": 1, "vocab_size": 9, "ssm_cfg": {"ngroups": 2}},
     r"ssm_cfg has keys with no MambaConfig field: \['ngroups'\]"),
    ({"d_model": 8, "n_layer": 1, "vocab_size": 9, "d_intermediate": 32},
     "d_intermediate must be 0"),
    ({"d_model": 8, "n_layer": 1, "vocab_size": 9, "attn_layer_idx": [0]},
     "attn_layer_idx must be empty"),
    ({"d_model": 8, "vocab_size": 9}, "mamba_ssm config lacks 'n_layer'"),
    ({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 9,
      "hidden_act": "gelu"},
     "hidden_act must be 'silu'; got 'gelu'"),
    ({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 9,
      "intermediate_size": 12},
     "intermediate_size must equal expand \\* hidden_size = 16; got 12"),
    ({"model_type": "mamba", "hidden_size": 8, "vocab_size": 9},
     "transformers config lacks 'num_hidden_layers'"),
    ({"n_embd": 8}, "neither the transformers format"),
    ({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 9}, "but no 'model_type'"),
    ({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16,
      "unpadded_vocab_size": 17}, r"unpadded_vocab_size must be an int in \[1, vocab_size=16\]"),
])
def test_error_unsupported_config(cfg, message):
  with pytest.raises(ValueError, match=message):
    pretrained.config_from_dict(cfg)


def test_error_no_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json in"):
    MambaLM.from_pretrained(tmp_path)


def test_error_no_weights(tied, tmp_path):
  (tmp_path / "config.json").write_text((tied[1] / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin or sharded"):
    MambaLM.from_pretrained(tmp_path)


def test_error_bin_without_torch(tied, tmp_path, monkeypatch):
  _write_mamba_ssm(tied[0], tmp_path / "m", extra_rows=0)
  monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
  with pytest.raises(ImportError, match="needs PyTorch"):
    MambaLM.from_pretrained(tmp_path / "m")


def test_error_safetensors_without_the_package(tied, monkeypatch):
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ImportError, match="needs the safetensors package"):
    MambaLM.from_pretrained(tied[1])
