"""Bad inputs to every public entry point: each must be a ValueError (or FileNotFoundError) that
names the argument or the file, never a TypeError from deep inside, a silent NaN or a crash.

One case per line, grouped by layer. A new entry point gets its cases here, so the next bad input
is caught by the suite and not by a user (issue 18).
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmax
from ssmax import discretize, hippo, lti, parallel, sharding
from ssmax.io import checkpoint, files
from ssmax.nn import MambaConfig, MambaLM, S4DLayer, pretrained

F = np.float32

# ----------------------------------------------------------------------------------------------
# Helpers.


def _raises(fn, match, exc=ValueError):
  with pytest.raises(exc, match=match):
    fn()


def _scan_args(b=2, l=5, d=3, n=2):
  r = np.random.default_rng(0)
  return dict(u=r.normal(size=(b, l, d)).astype(F), delta=r.uniform(.1, .5, (b, l, d)).astype(F),
              A=-r.uniform(.5, 1, (d, n)).astype(F), B=r.normal(size=(b, l, n)).astype(F),
              C=r.normal(size=(b, l, n)).astype(F))


def _step_args(b=2, d=3, n=2):
  r = np.random.default_rng(1)
  return dict(state=np.zeros((b, d, n), F), u=r.normal(size=(b, d)).astype(F),
              delta=r.uniform(.1, .5, (b, d)).astype(F), A=-np.ones((d, n), F),
              B=r.normal(size=(b, n)).astype(F), C=r.normal(size=(b, n)).astype(F))


# ----------------------------------------------------------------------------------------------
# The selective scan and its step.

SCAN_CASES = {
    "u rank": (dict(u=np.zeros((2, 5), F)), r"u must have rank 3"),
    "u int": (dict(u=np.zeros((2, 5, 3), np.int32)), r"u must have a floating-point dtype"),
    "u string": (dict(u="abc"), r"^u must"),
    "u None": (dict(u=None), r"^u must"),
    "empty length": (dict(u=np.zeros((2, 0, 3), F)), r"u must have length >= 1"),
    "delta shape": (dict(delta=np.zeros((2, 5, 4), F)), r"delta must have shape \(2, 5, 3\)"),
    "A channels": (dict(A=np.zeros((4, 2), F)), r"A must have shape \(3, state\)"),
    "A rank": (dict(A=np.zeros((3,), F)), r"A must have rank 2"),
    "B state": (dict(B=np.zeros((2, 5, 7), F)), r"B must have shape"),
    "C groups": (dict(C=np.zeros((2, 5, 2, 2), F)), r"C has 2 groups, which must divide"),
    "D shape": (dict(D=np.zeros((4,), F)), r"D must have shape \(3,\)"),
    "z shape": (dict(z=np.zeros((2, 4, 3), F)), r"z must have shape"),
    "bias shape": (dict(delta_bias=np.zeros((2,), F)), r"delta_bias must have shape"),
    "state shape": (dict(initial_state=np.zeros((2, 3, 5), F)), r"initial_state must have shape"),
    "softplus": (dict(delta_softplus=1), r"delta_softplus must be a Python bool"),
    "backend": (dict(backend="cuda"), r"backend must be one of"),
}


@pytest.mark.parametrize("case", SCAN_CASES, ids=list(SCAN_CASES))
def test_selective_scan(case):
  change, match = SCAN_CASES[case]
  _raises(lambda: ssmax.selective_scan(**{**_scan_args(), **change}), match)


@pytest.mark.parametrize("name", ["B", "C"])
def test_selective_scan_complex_b_or_c_with_real_a(name):
  x = _scan_args()
  x[name] = x[name] + 1j * x[name]
  for backend in ("sequential", "associative"):
    _raises(lambda: ssmax.selective_scan(**x, backend=backend), rf"{name} is complex")


def test_selective_scan_pallas_declines_with_a_reason():
  x = _scan_args()
  x["A"] = x["A"] + 0j
  _raises(lambda: ssmax.selective_scan(**x, backend="pallas"), r"pallas.*complex A")


STEP_CASES = {
    "state rank": (dict(state=np.zeros((2, 3), F)), r"^state must have rank 3"),
    "state shape": (dict(state=np.zeros((2, 3, 5), F)), r"^state must have shape"),
    "u rank": (dict(u=np.zeros((2, 1, 3), F)), r"^u must have rank 2"),
    "delta shape": (dict(delta=np.zeros((2, 4), F)), r"^delta must have shape .*\(batch, channels\)"),
    "B rank": (dict(B=np.zeros((2,), F)), r"^B must have rank 2 or 3"),
    "z rank": (dict(z=np.zeros((2, 1, 3), F)), r"^z must have rank 2"),
    "delta_proj": (dict(delta_proj=np.zeros((2, 4), F)), r"^delta_proj must have shape"),
    "backend": (dict(backend="fast"), r"backend must be one of"),
}


@pytest.mark.parametrize("case", STEP_CASES, ids=list(STEP_CASES))
def test_selective_state_update(case):
  change, match = STEP_CASES[case]
  _raises(lambda: ssmax.selective_state_update(**{**_step_args(), **change}), match)


# ----------------------------------------------------------------------------------------------
# Maths.

HIPPO_CASES = [
    (lambda: hippo.legs(0), r"N must be a positive integer; got 0"),
    (lambda: hippo.legt(-3), r"N must be a positive integer"),
    (lambda: hippo.fout("4"), r"N must be a positive integer; got '4'"),
    (lambda: hippo.lagt(2.5), r"N must be a positive integer"),
    (lambda: hippo.nplr("legx", 4), r"measure must be one of"),
    (lambda: hippo.s4d_lin(True), r"N must be a positive integer"),
    (lambda: hippo.legs(4, dtype=jnp.int32), r"dtype"),
]


@pytest.mark.parametrize("i", range(len(HIPPO_CASES)))
def test_hippo(i):
  fn, match = HIPPO_CASES[i]
  _raises(fn, match)


A3, B3 = -np.ones(3, F), np.ones(3, F)
DISCRETIZE_CASES = [
    (dict(dt=0.0), r"dt must be finite and > 0; got 0.0"),
    (dict(dt=-0.1), r"dt must be finite and > 0; got -0.1"),
    (dict(dt=float("nan")), r"dt must be finite and > 0; got nan"),
    (dict(dt=float("inf")), r"dt must be finite and > 0; got inf"),
    (dict(dt=np.array([0.1, 0.0, 0.2], F)), r"dt must be finite and > 0 everywhere"),
    (dict(dt="0.1"), r"dt must be an array or a number; got str '0.1'"),
    (dict(dt=None), r"dt must be an array or a number; got None"),
    (dict(dt=np.ones(4, F)), r"dt must be a scalar or have shape"),
    (dict(A=np.ones((3, 2), F)), r"A must have shape \(3, 3\)"),
    (dict(B=np.ones(4, F)), r"B must have shape \(3,\)"),
    (dict(A=np.ones(3, np.int32)), r"A must have a floating or complex dtype"),
]


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("i", range(len(DISCRETIZE_CASES)))
def test_discretize(method, i):
  change, match = DISCRETIZE_CASES[i]
  args = {**dict(A=A3, B=B3, dt=0.1), **change}
  _raises(lambda: getattr(discretize, method)(args["A"], args["B"], args["dt"]), match)


def test_discretize_traced_dt_is_not_inspected():
  """Under jit the value of dt is unknown at trace time: it runs (documented)."""
  Ab, _ = jax.jit(discretize.zoh)(A3, B3, 0.1)
  np.testing.assert_allclose(Ab, np.exp(-0.1), rtol=1e-6)


LTI_CASES = [
    (lambda: lti.kernel(np.ones(3, F), np.ones(3, F), np.ones(3, F), 0), r"L must be a positive"),
    (lambda: lti.kernel(np.ones(3, F), np.ones(4, F), np.ones(3, F), 5), r"Bb must have shape"),
    (lambda: lti.causal_conv(np.ones((2, 5, 3), np.int32), np.ones(5, F)), r"u must have a float"),
    (lambda: lti.causal_conv(np.ones((2, 5, 3), F), np.ones((5, 4), F)), r"K must have shape"),
    (lambda: lti.causal_conv(np.ones((2, 0, 3), F), np.ones(5, F)), r"u must have length >= 1"),
    (lambda: lti.causal_conv(np.ones((2, 5, 3), F), np.ones((0,), F)), r"K must have at least"),
    (lambda: lti.recurrence(np.ones(3, F), np.ones(3, F), np.ones(3, F), np.ones((5, 2), F)),
     r"^u must"),
]


@pytest.mark.parametrize("i", range(len(LTI_CASES)))
def test_lti(i):
  fn, match = LTI_CASES[i]
  _raises(fn, match)


# ----------------------------------------------------------------------------------------------
# Modules.

CONFIG_CASES = [
    (dict(dt_max=float("inf")), r"dt_max must be > 0 and finite"),
    (dict(dt_max=1e300), r"dt_max must be > 0 and finite in float32"),
    (dict(dt_scale=float("inf")), r"dt_scale must be > 0 and finite"),
    (dict(dt_scale=float("nan")), r"dt_scale must be > 0 and finite"),
    (dict(dt_min=float("nan")), r"dt_min must be > 0 and finite"),
    (dict(dt_min=0.2, dt_max=0.1), r"0 < dt_min <= dt_max"),
    (dict(dt_init_floor=-1.0), r"dt_init_floor must be >= 0 and finite"),
    (dict(norm_epsilon=float("inf")), r"norm_epsilon must be > 0 and finite"),
    (dict(dt_scale="1.0"), r"dt_scale must be > 0 and finite"),
    (dict(d_model=0), r"d_model must be a positive integer"),
    (dict(vocab_size=2.5), r"vocab_size must be a positive integer"),
    (dict(ssm="s5"), r"ssm must be one of"),
    (dict(scan_backend="gpu"), r"scan_backend must be one of"),
    (dict(dtype=jnp.int32), r"dtype must be a floating-point dtype"),
]


@pytest.mark.parametrize("i", range(len(CONFIG_CASES)))
def test_mamba_config(i):
  change, match = CONFIG_CASES[i]
  _raises(lambda: MambaConfig(**{**dict(d_model=8, n_layer=1, vocab_size=9, d_state=2),
                                 **change}), match)


def test_s4d_layer_bad_dt_range():
  _raises(lambda: S4DLayer(4, d_state=2, dt_min=0.1, dt_max=float("inf"), rngs=nnx.Rngs(0)),
          r"dt_max must be > 0 and finite")


@pytest.fixture(scope="module")
def tiny_lm():
  return MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=9, d_state=2), rngs=nnx.Rngs(0))


def test_lm_tokens(tiny_lm):
  _raises(lambda: tiny_lm(jnp.zeros((2, 3), jnp.float32)), r"tokens")
  _raises(lambda: tiny_lm(jnp.zeros((3,), jnp.int32)), r"tokens")


def test_generate_arguments(tiny_lm):
  prompt = jnp.zeros((1, 2), jnp.int32)
  _raises(lambda: tiny_lm.generate(prompt, -1), r"max_new_tokens")
  _raises(lambda: tiny_lm.generate(prompt, 2, temperature=-1.0), r"temperature")
  _raises(lambda: tiny_lm.generate(prompt, 2, temperature=1.0), r"key")


def test_generate_takes_a_numpy_integer(tiny_lm):
  out = tiny_lm.generate(jnp.zeros((1, 2), jnp.int32), np.int64(2))
  assert out.shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# Files: PyTorch checkpoints.


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory, tiny_lm):
  path = tmp_path_factory.mktemp("lm")
  tiny_lm.save_pretrained(path)
  return path


def _copy(src: pathlib.Path, dst: pathlib.Path, *names):
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


def test_from_pretrained_missing_directory(tmp_path):
  _raises(lambda: MambaLM.from_pretrained(tmp_path / "nope"), r"no config.json in .*nope",
          FileNotFoundError)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_bad_config_json_names_the_file(saved_lm, tmp_path, text):
  d = _copy(saved_lm, tmp_path / "m", "model.safetensors")
  (d / "config.json").write_bytes(text.encode("latin-1"))
  _raises(lambda: MambaLM.from_pretrained(d), r"config\.json")


def test_config_without_model_type_is_refused(saved_lm, tmp_path):
  d = _copy(saved_lm, tmp_path / "m", "model.safetensors")
  cfg = json.loads((saved_lm / "config.json").read_text())
  del cfg["model_type"]
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(lambda: MambaLM.from_pretrained(d), r"no 'model_type'")


def test_truncated_safetensors_names_the_file(saved_lm, tmp_path):
  d = _copy(saved_lm, tmp_path / "m", "config.json")
  data = (saved_lm / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  _raises(lambda: MambaLM.from_pretrained(d), r"cannot read .*model\.safetensors")


def _write_bin(saved_lm, d):
  import torch

  tensors = files.read_tensors(saved_lm)
  torch.save({k: torch.as_tensor(v) for k, v in tensors.items()}, d / "pytorch_model.bin")


def test_truncated_bin_names_the_file(saved_lm, tmp_path):
  d = _copy(saved_lm, tmp_path / "m", "config.json")
  _write_bin(saved_lm, d)
  data = (d / "pytorch_model.bin").read_bytes()
  (d / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
  _raises(lambda: MambaLM.from_pretrained(d), r"cannot read .*pytorch_model\.bin")


def test_malicious_pickle_is_refused(saved_lm, tmp_path):
  import torch

  d = _copy(saved_lm, tmp_path / "m", "config.json")
  torch.save({"x": torch.zeros(1), "evil": os.getcwd}, d / "pytorch_model.bin")
  _raises(lambda: MambaLM.from_pretrained(d), r"refusing to load .*pytorch_model\.bin")


def _index(d, weight_map):
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("index, match, exc", [
    ({"metadata": {}}, r"model\.safetensors\.index\.json must have a non-empty 'weight_map'",
     ValueError),
    ({"weight_map": []}, r"must have a non-empty 'weight_map'", ValueError),
    ({"weight_map": {"a": 3}}, r"must have a non-empty 'weight_map'", ValueError),
    ({"weight_map": {"a": "../outside.safetensors"}}, r"outside .*refusing", ValueError),
    ({"weight_map": {"a": "/etc/passwd"}}, r"outside .*refusing", ValueError),
    ({"weight_map": {"a": "shard-2.safetensors"}}, r"shard 'shard-2\.safetensors' named by",
     FileNotFoundError),
])
def test_bad_index_file(saved_lm, tmp_path, index, match, exc):
  d = _copy(saved_lm, tmp_path / "m", "config.json")
  (tmp_path / "outside.safetensors").write_bytes((saved_lm / "model.safetensors").read_bytes())
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  _raises(lambda: MambaLM.from_pretrained(d), match, exc)


def test_shard_link_out_of_the_folder_is_refused(saved_lm, tmp_path):
  d = _copy(saved_lm, tmp_path / "m", "config.json")
  (tmp_path / "outside.safetensors").write_bytes((saved_lm / "model.safetensors").read_bytes())
  (d / "shard.safetensors").symlink_to(tmp_path / "outside.safetensors")
  _index(d, {"a": "shard.safetensors"})
  _raises(lambda: MambaLM.from_pretrained(d), r"outside .*refusing")


def test_save_pretrained_bad_model(tmp_path):
  _raises(lambda: pretrained.save_pretrained({"a": 1}, tmp_path), r"model must be a MambaLM")


# ----------------------------------------------------------------------------------------------
# Files: Orbax checkpoints.

CHECKPOINT_CASES = [
    (lambda m, p: checkpoint.save(p, m, step=-1), r"step must be a non-negative int"),
    (lambda m, p: checkpoint.save(p, m, step=1.0), r"step must be a non-negative int"),
    (lambda m, p: checkpoint.save(p, {"a": 1}, step=0), r"model must be a flax\.nnx\.Module"),
    (lambda m, p: checkpoint.save(p, m, step=0, max_to_keep=0), r"max_to_keep must be"),
    (lambda m, p: checkpoint.restore(p / "missing", m), r"directory .*missing does not exist"),
    (lambda m, p: checkpoint.latest_step(p / "missing"), r"directory .*missing does not exist"),
]


@pytest.mark.parametrize("i", range(len(CHECKPOINT_CASES)))
def test_checkpoint(tmp_path, i):
  fn, match = CHECKPOINT_CASES[i]
  _raises(lambda: fn(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path), match)


# ----------------------------------------------------------------------------------------------
# Many devices (one CPU device here: the checks run before any sharding).


def test_parallel():
  mesh = parallel.make_mesh(data=1, seq=1)
  x = _scan_args()
  _raises(lambda: parallel.make_mesh(data=0), r"data must be a positive integer")
  _raises(lambda: parallel.make_mesh(data=2, seq=4), r"exceeds the 1 available devices")
  _raises(lambda: parallel.selective_scan("mesh", **x), r"mesh must be a jax\.sharding\.Mesh")
  _raises(lambda: parallel.selective_scan(mesh, **x, sequence_axis="length"),
          r"sequence_axis='length' is not an axis of the mesh")
  _raises(lambda: parallel.selective_scan(mesh, **x, data_axis="seq"),
          r"must be different mesh axes")
  _raises(lambda: parallel.shard_batch(mesh, {"t": np.float32(1.0)}), r"batch\['t'\] must have")
  _raises(lambda: sharding.sequence_halo(jnp.zeros((1, 4, 2)), 1, "seq"),
          r"axis_name='seq' is not bound")
