"""Tests of ssmax.nn's modules against float64 NumPy loops (mixer, block, LM) and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seeds
from ssmax import nn as snn

# ---------------------------------------------------------------------------------------------
# Float64 NumPy references, independent of ssmax.


def f64(v):
  return np.asarray(v, np.float64)


def silu(x):
  return x / (1.0 + np.exp(-x))


def softplus(x):
  return np.logaddexp(0.0, x)


def rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def mixer_params(m):
  """The mixer's parameters as float64 NumPy arrays."""
  p = dict(W_in=f64(m.in_proj.kernel[...]), conv_w=f64(m.conv1d.kernel[...])[:, 0, :],
           conv_b=f64(m.conv1d.bias[...]), A_log=f64(m.A_log[...]), D=f64(m.D[...]),
           W_out=f64(m.out_proj.kernel[...]))
  if m.ssm == "selective":
    p.update(W_x=f64(m.x_proj.kernel[...]), W_dt=f64(m.dt_proj.kernel[...]),
             b_dt=f64(m.dt_proj.bias[...]))
  return p


def mixer(p, x, *, d_state, dt_rank, gated=True):
  """Mamba mixer on ``x`` (batch, length, d_model): explicit conv loop and recurrence loop."""
  b, length, _ = x.shape
  d_conv, d_inner = p["conv_w"].shape
  xz = x @ p["W_in"]
  xs, z = (xz[..., :d_inner], xz[..., d_inner:]) if gated else (xz, None)
  u = np.zeros_like(xs)
  for t in range(length):
    for k in range(d_conv):
      src = t - (d_conv - 1) + k
      if src >= 0:
        u[:, t] += p["conv_w"][k] * xs[:, src]
  u = silu(u + p["conv_b"])
  x_dbl = u @ p["W_x"]
  dt = softplus(x_dbl[..., :dt_rank] @ p["W_dt"] + p["b_dt"])
  B = x_dbl[..., dt_rank:dt_rank + d_state]
  C = x_dbl[..., dt_rank + d_state:]
  A = -np.exp(p["A_log"])
  h = np.zeros((b, d_inner, d_state))
  y = np.zeros_like(u)
  for t in range(length):
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    y[:, t] = np.sum(h * C[:, t, None, :], axis=-1) + p["D"] * u[:, t]
  if gated:
    y = y * silu(z)
  return y @ p["W_out"]


def lm(model, tokens):
  """MambaLM logits (batch, length, padded_vocab) in float64 from the model's parameters."""
  cfg = model.config
  emb = f64(model.embedding.embedding[...])
  x = emb[np.asarray(tokens)]
  for layer in model.layers:
    h = rms_norm(x, f64(layer.norm.weight[...]), cfg.norm_epsilon)
    x = x + mixer(mixer_params(layer.mixer), h, d_state=cfg.d_state,
                  dt_rank=layer.mixer.dt_rank, gated=cfg.gated)
  x = rms_norm(x, f64(model.norm_f.weight[...]), cfg.norm_epsilon)
  head = emb.T if cfg.tie_embeddings else f64(model.lm_head.kernel[...])
  return x @ head


def s4d_system(layer):
  """S4D's ZOH-discretised diagonal system in float64 closed form: Ab, Bb, C (H, M), D (H,)."""
  A = -np.exp(f64(layer.A_log[...]))
  B, C = f64(layer.B_re[...]), f64(layer.C_re[...])
  if layer.complex:
    A = A + 1j * f64(layer.A_im[...])
    B, C = B + 1j * f64(layer.B_im[...]), C + 1j * f64(layer.C_im[...])
  dt = np.exp(f64(layer.log_dt[...]))[:, None]
  Ab = np.exp(dt * A)
  return Ab, (Ab - 1) / A * B, C, f64(layer.D[...])


def s4_system(layer):
  """S4's bilinear-discretised dense system in float64: Ab (H, N, N), Bb, C (H, N), D (H,)."""
  lam = np.minimum(f64(layer.Lambda_re[...]), -1e-4) + 1j * f64(layer.Lambda_im[...])
  P = f64(layer.P_re[...]) + 1j * f64(layer.P_im[...])
  B = f64(layer.B_re[...]) + 1j * f64(layer.B_im[...])
  C = f64(layer.C_re[...]) + 1j * f64(layer.C_im[...])
  dt = np.exp(f64(layer.log_dt[...]))
  Abs, Bbs = [], []
  for h in range(lam.shape[0]):
    A = np.diag(lam[h]) - np.outer(P[h], P[h].conj())
    eye = np.eye(A.shape[0])
    left = eye - dt[h] / 2 * A
    Abs.append(np.linalg.solve(left, eye + dt[h] / 2 * A))
    Bbs.append(np.linalg.solve(left, dt[h] * B[h]))
  return np.stack(Abs), np.stack(Bbs), C, f64(layer.D[...])


def lti_recurrence(Ab, Bb, C, D, u, h0=None):
  """x' = Ab x + Bb u_t, y_t = Re(C x') + D u_t per channel; Ab (H, M) diagonal or (H, M, M)."""
  b, length, H = u.shape
  h = np.zeros((b,) + Bb.shape, complex) if h0 is None else np.array(h0, complex)
  y = np.zeros(u.shape)
  for t in range(length):
    h = (np.einsum("hmn,bhn->bhm", Ab, h) if Ab.ndim == 3 else Ab * h) + Bb * u[:, t, :, None]
    y[:, t] = np.real(np.sum(C * h, axis=-1)) + D * u[:, t]
  return y, h


# ---------------------------------------------------------------------------------------------
# Helpers.

TINY = dict(d_model=5, n_layer=2, vocab_size=37, d_state=3, d_conv=3, pad_vocab_size_multiple=8)


def perturb(module, seed, scale=0.1):
  """Adds noise to every parameter so that tests do not rely on special init values."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))
  return module


def rel_err(got, want):
  got, want = np.asarray(got).astype(np.complex128), np.asarray(want).astype(np.complex128)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


@jax.jit
def _apply(module, *args):
  return module(*args)


@pytest.fixture(scope="module")
def tiny_lm():
  """A small perturbed MambaLM shared by the tests that only read it."""
  return perturb(snn.MambaLM(snn.MambaConfig(**TINY), rngs=nnx.Rngs(4)), 5)


# ---------------------------------------------------------------------------------------------
# The official 130M shape.


def test_param_count_130m_is_official():
  cfg = snn.MambaConfig(d_model=768, n_layer=24)
  assert cfg.padded_vocab_size == 50280 and cfg.resolved_dt_rank == 48 and cfg.d_inner == 1536
  model = nnx.eval_shape(lambda: snn.MambaLM(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == 129_135_360
  mixer = model.layers[0].mixer
  assert mixer.in_proj.kernel.shape == (768, 3072) and mixer.in_proj.bias is None
  assert mixer.conv1d.kernel.shape == (4, 1, 1536) and mixer.conv1d.bias.shape == (1536,)
  assert mixer.x_proj.kernel.shape == (1536, 80) and mixer.dt_proj.kernel.shape == (48, 1536)
  assert mixer.A_log.shape == (1536, 16) and mixer.D.shape == (1536,)
  assert mixer.out_proj.kernel.shape == (1536, 768)
  assert model.embedding.embedding.shape == (50280, 768) and not hasattr(model, "lm_head")


def test_130m_forward_under_jit():
  cfg = snn.MambaConfig(d_model=768, n_layer=24)
  model = snn.MambaLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.array([[50276, 0, 17, 4000, 9, 9, 123, 50000]], jnp.int32)
  logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert logits.shape == (1, 8, 50280) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Official init at this size: embedding N(0, 0.02), out_proj U(+-1/sqrt(d_inner)) / sqrt(24).
  emb = np.asarray(model.embedding.embedding[...])
  assert abs(emb.std() - 0.02) < 1e-4 and abs(emb.mean()) < 1e-4
  out = np.asarray(model.layers[5].mixer.out_proj.kernel[...])
  bound = 1536**-0.5 / math.sqrt(24)
  assert np.abs(out).max() <= bound and abs(out.std() - bound / math.sqrt(3)) < 0.02 * bound
  np.testing.assert_array_equal(np.asarray(model.norm_f.weight[...]), 1.0)


# ---------------------------------------------------------------------------------------------
# Mixer, block, LM against the float64 loops.


@pytest.mark.parametrize("gated,backend", [(True, "sequential"), (False, "associative")])
def test_mixer_matches_numpy_loop(gated, backend):
  d_model, d_state, length = 5, 3, 37
  config = snn.MambaConfig(d_model=d_model, n_layer=1, d_state=d_state, d_conv=3, expand=2,
                           dt_rank=2, gated=gated, scan_backend=backend)
  m = snn.MambaMixer(config, rngs=nnx.Rngs(1))
  perturb(m, 2)
  x = jax.random.normal(jax.random.key(3), (2, length, d_model))
  want = mixer(mixer_params(m), f64(x), d_state=d_state, dt_rank=2, gated=gated)
  assert rel_err(_apply(m, x), want) < 2e-4


def test_lm_matches_numpy_loop(tiny_lm):
  tokens = jax.random.randint(jax.random.key(6), (2, 11), 0, 37)
  logits = _apply(tiny_lm, tokens)
  assert logits.shape == (2, 11, 40)
  assert rel_err(logits, lm(tiny_lm, tokens)) < 2e-4


def test_untied_head_matches_numpy_loop():
  cfg = snn.MambaConfig(**TINY, tie_embeddings=False)
  model = perturb(snn.MambaLM(cfg, rngs=nnx.Rngs(7)), 8)
  assert model.lm_head.kernel.shape == (5, 40)
  tokens = jax.random.randint(jax.random.key(9), (1, 7), 0, cfg.vocab_size)
  assert rel_err(_apply(model, tokens), lm(model, tokens)) < 2e-4


def test_pretrained_round_trip(tiny_lm, tmp_path):
  tiny_lm.save_pretrained(tmp_path)
  loaded = snn.MambaLM.from_pretrained(tmp_path)
  assert loaded.config.padded_vocab_size == 40 and loaded.config.d_model == 5
  want = nnx.to_flat_state(nnx.state(tiny_lm, nnx.Param))
  got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert len(got) == len(want)
  for path, v in want:
    np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(v.get_value()))


def test_rms_norm_matches_numpy():
  norm = perturb(snn.RMSNorm(7, eps=1e-3), 10)
  x = jax.random.normal(jax.random.key(11), (3, 5, 7))
  want = rms_norm(f64(x), f64(norm.weight[...]), 1e-3)
  assert rel_err(norm(x), want) < 1e-5


def test_block_keeps_residual_in_fp32_with_bf16_compute():
  cfg = snn.MambaConfig(**TINY, dtype=jnp.bfloat16)
  model = perturb(snn.MambaLM(cfg, rngs=nnx.Rngs(12)), 13)
  tokens = jax.random.randint(jax.random.key(13), (2, 9), 0, cfg.vocab_size)

  @jax.jit
  def first_block(model, tokens):
    x = model.embedding(tokens).astype(model.residual_dtype)
    block = model.layers[0]
    return x, block(x), block.mixer(block.norm(x))

  x, y, h = first_block(model, tokens)
  assert x.dtype == jnp.float32 and y.dtype == jnp.float32 and h.dtype == jnp.bfloat16
  # The block adds exactly the mixer's output to the float32 stream.
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x + h.astype(jnp.float32)))
  logits = _apply(model, tokens)
  assert logits.dtype == jnp.bfloat16
  assert rel_err(logits, lm(model, tokens)) < 3e-2


# ---------------------------------------------------------------------------------------------
# Initialisation.


def test_mixer_init_statistics():
  dt_min, dt_max, floor, n_layer = 0.002, 0.05, 1e-4, 9
  d_model, d_state, d_conv = 48, 7, 3
  config = snn.MambaConfig(d_model=d_model, d_state=d_state, d_conv=d_conv, dt_min=dt_min,
                           dt_max=dt_max, dt_init_floor=floor, n_layer=n_layer)
  m = snn.MambaMixer(config, rngs=nnx.Rngs(14))
  d_inner, rank = 96, 3
  assert m.dt_rank == rank
  dt = softplus(f64(m.dt_proj.bias[...]))
  assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
  # log-uniform: log dt spreads over the whole range
  logs = (np.log(dt) - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))
  assert logs.min() < 0.1 and logs.max() > 0.9 and abs(logs.mean() - 0.5) < 0.1
  np.testing.assert_allclose(f64(m.A_log[...]),
                             np.log(np.tile(np.arange(1, d_state + 1), (d_inner, 1))), rtol=1e-6)
  np.testing.assert_array_equal(f64(m.D[...]), np.ones(d_inner))

  def check_uniform(w, bound):
    w = f64(w)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound

  check_uniform(m.dt_proj.kernel[...], rank**-0.5)
  check_uniform(m.in_proj.kernel[...], d_model**-0.5)
  check_uniform(m.x_proj.kernel[...], d_inner**-0.5)
  check_uniform(m.out_proj.kernel[...], d_inner**-0.5 / math.sqrt(n_layer))
  check_uniform(m.conv1d.kernel[...], d_conv**-0.5)
  check_uniform(m.conv1d.bias[...], d_conv**-0.5)


def test_dt_floor_clamps_and_constant_dt_init():
  config = snn.MambaConfig(d_model=48, n_layer=1, d_state=7, d_conv=3, dt_min=1e-5, dt_max=2e-5,
                           dt_init_floor=1e-3, dt_init="constant", dt_scale=2.0)
  m = snn.MambaMixer(config, rngs=nnx.Rngs(15))
  np.testing.assert_allclose(softplus(f64(m.dt_proj.bias[...])), 1e-3, rtol=1e-4)
  np.testing.assert_allclose(f64(m.dt_proj.kernel[...]), 2.0 / math.sqrt(3), rtol=1e-6)


def test_config_defaults_are_official():
  cfg = snn.MambaConfig()
  assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_state, cfg.d_conv, cfg.expand) == (
      2560, 64, 50277, 16, 4, 2)
  assert (cfg.dt_min, cfg.dt_max, cfg.dt_init, cfg.dt_scale, cfg.dt_init_floor) == (
      0.001, 0.1, "random", 1.0, 1e-4)
  assert cfg.conv_bias and not cfg.bias and cfg.rms_norm and cfg.residual_in_fp32
  assert cfg.tie_embeddings and cfg.norm_epsilon == 1e-5 and cfg.pad_vocab_size_multiple == 8
  assert cfg.resolved_dt_rank == 160 and cfg.padded_vocab_size == 50280


# ---------------------------------------------------------------------------------------------
# Transformations.


def test_vmap_over_batch_equals_batched_forward(tiny_lm):
  model = tiny_lm
  tokens = jax.random.randint(jax.random.key(18), (3, 6), 0, 37)
  graphdef, state = nnx.split(model)
  one = lambda t: nnx.merge(graphdef, state)(t[None])[0]
  np.testing.assert_allclose(jax.jit(jax.vmap(one))(tokens), _apply(model, tokens), rtol=1e-5,
                             atol=1e-6)
  per = nnx.jit(nnx.vmap(lambda m, t: m(t[None])[0], in_axes=(None, 0)))(model, tokens)
  np.testing.assert_allclose(per, _apply(model, tokens), rtol=1e-5, atol=1e-6)


def test_grad_matches_finite_difference(tiny_lm):
  model = tiny_lm
  tokens = jax.random.randint(jax.random.key(21), (2, 8), 0, 37)

  def loss(m):
    logits = m(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grads = nnx.jit(nnx.grad(loss))(model)
  g_state = nnx.state(grads, nnx.Param)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g_state))
  # Directional derivative along a random direction against a central difference (float64 LM).
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(22), len(leaves))
  direction = [jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
  analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(g_state), direction))

  def loss64(sign, eps=1e-4):
    nnx.update(model, jax.tree.unflatten(treedef, [v + sign * eps * d
                                                   for v, d in zip(leaves, direction)]))
    logits = lm(model, tokens[:, :-1])
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return -np.mean(np.take_along_axis(logp, np.asarray(tokens[:, 1:, None]), -1))

  numeric = (loss64(1) - loss64(-1)) / 2e-4
  assert abs(analytic - numeric) < 1e-3 * max(1.0, abs(numeric))


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_layer=2.0), "n_layer must be a positive integer"),
    (dict(dt_rank="full"), "dt_rank must be a positive integer"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min and dt_max"),
    (dict(dt_init="normal"), "dt_init must be one of"),
    (dict(ssm="s5"), "ssm must be one of"),
    (dict(scan_backend="cuda"), "scan_backend must be one of"),
    (dict(dtype=jnp.int32), "dtype must be a floating-point dtype"),
    (dict(norm_epsilon=0.0), "norm_epsilon must be > 0"),
])
def test_config_errors_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    snn.MambaConfig(**kwargs)


def test_lm_rejects_bad_tokens(tiny_lm):
  model = tiny_lm
  with pytest.raises(ValueError, match="tokens must have an integer dtype; got float32"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError,
                     match=r"tokens must have rank 2 \(batch, length\); got shape \(4,\)"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens must lie in \[0, 40\); got values in \[0, 40\]"):
    model(jnp.array([[0, 40]]))
  with pytest.raises(ValueError, match="config must be a MambaConfig"):
    snn.MambaLM(dict(d_model=5), rngs=nnx.Rngs(0))


def test_mixer_rejects_bad_input():
  m = snn.MambaMixer(snn.MambaConfig(d_model=5, n_layer=1, d_state=3), rngs=nnx.Rngs(24))
  with pytest.raises(ValueError, match=r"x must have shape \(\?, \?, 5\)"):
    m(jnp.zeros((1, 4, 6)))
  with pytest.raises(ValueError, match="x must have rank 3"):
    m(jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="x must have a floating-point dtype"):
    m(jnp.zeros((1, 4, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"state.ssm must have shape \(2, 10, 3\)"):
    m(jnp.zeros((2, 4, 5)), snn.MixerState(jnp.zeros((2, 4, 10)), jnp.zeros((2, 10, 4))))
  with pytest.raises(ValueError, match="d_conv must be a positive integer"):
    snn.MambaMixer(snn.MambaConfig(d_model=5, n_layer=1, d_conv=0), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# S4D and S4 layers: convolution mode, recurrent mode and the float64 recurrence agree.


@jax.jit
def _steps(layer, u):
  """Runs ``layer.step`` over ``u`` (batch, length, H); returns outputs and the last state."""

  def body(state, u_t):
    y_t, state = layer.step(state, u_t)
    return state, y_t

  last, y = jax.lax.scan(body, layer.init_state(u.shape[0]), jnp.swapaxes(u, 0, 1))
  return jnp.swapaxes(y, 0, 1), last


@pytest.mark.parametrize("init,d_state", [("lin", 6), ("inv", 4), ("real", 3)])
def test_s4d_layer_conv_and_step_match_numpy(init, d_state):
  layer = perturb(snn.S4DLayer(5, d_state=d_state, init=init, rngs=nnx.Rngs(30)), 31)
  u = jax.random.normal(jax.random.key(32), (2, 37, 5))
  want, want_last = lti_recurrence(*s4d_system(layer), f64(u))
  assert rel_err(_apply(layer, u), want) < 2e-4
  y_step, last = _steps(layer, u)
  assert rel_err(y_step, want) < 2e-4 and rel_err(last, want_last) < 2e-4
  if init != "lin":
    return
  # Convolution mode carries the state across chunks.
  y1, s1 = jax.jit(lambda m, x: m(x, return_state=True))(layer, u[:, :20])
  y2, s2 = jax.jit(lambda m, x, s: m(x, s, return_state=True))(layer, u[:, 20:], s1)
  assert rel_err(jnp.concatenate([y1, y2], axis=1), want) < 2e-4
  assert rel_err(s2, want_last) < 2e-4


def test_s4_layer_conv_and_step_match_numpy():
  layer = perturb(snn.S4Layer(5, d_state=4, rngs=nnx.Rngs(33)), 34, scale=0.05)
  u = jax.random.normal(jax.random.key(35), (2, 37, 5))
  want, want_last = lti_recurrence(*s4_system(layer), f64(u))
  assert rel_err(_apply(layer, u), want) < 2e-4
  y_step, last = _steps(layer, u)
  assert rel_err(y_step, want) < 2e-4 and rel_err(last, want_last) < 2e-4


def test_s4_and_s4d_init():
  s4d = snn.S4DLayer(3, d_state=8, init="lin", dt_min=0.01, dt_max=0.02, rngs=nnx.Rngs(36))
  A, _, _, dt = s4d.ssm()
  np.testing.assert_allclose(np.asarray(A), np.tile(-0.5 + 1j * np.pi * np.arange(4), (3, 1)),
                             rtol=1e-6)
  assert np.all((np.asarray(dt) >= 0.01 * (1 - 1e-6)) & (np.asarray(dt) <= 0.02 * (1 + 1e-6)))
  real = snn.S4DLayer(3, d_state=5, init="real", rngs=nnx.Rngs(37))
  np.testing.assert_allclose(np.asarray(real.ssm()[0]), np.tile(-np.arange(1.0, 6.0), (3, 1)),
                             rtol=1e-6)
  assert real.init_state(2).shape == (2, 3, 5) and s4d.init_state(2).shape == (2, 3, 4)
  s4 = snn.S4Layer(2, d_state=6, rngs=nnx.Rngs(38))
  lam = s4.ssm()[0]
  # LegS's normal part is -1/2 I plus a skew-symmetric matrix: Re(Lambda) = -1/2.
  np.testing.assert_allclose(np.real(np.asarray(lam)), -0.5, atol=1e-5)


def test_s4_layers_grad_is_finite():
  u = jax.random.normal(jax.random.key(39), (1, 9, 3))
  for layer in (snn.S4DLayer(3, d_state=4, rngs=nnx.Rngs(40)), snn.S4Layer(3, d_state=4,
                                                                          rngs=nnx.Rngs(41))):
    grads = jax.jit(jax.grad(lambda m: jnp.sum(m(u) ** 2)))(layer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(np.any(np.asarray(g) != 0) for g in leaves)


def test_s4_layers_reject_bad_input():
  with pytest.raises(ValueError, match="d_state must be even for the complex init 'lin'; got 5"):
    snn.S4DLayer(3, d_state=5, init="lin", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init must be one of"):
    snn.S4DLayer(3, init="legs", rngs=nnx.Rngs(0))
  layer = snn.S4DLayer(3, d_state=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"u must have shape \(\?, \?, 3\)"):
    layer(jnp.zeros((1, 5, 4)))
  with pytest.raises(ValueError, match=r"state must have shape \(1, 3, 2\)"):
    layer.step(jnp.zeros((1, 3, 4), jnp.complex64), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"u_t must have rank 2 \(batch, channels\)"):
    layer.step(layer.init_state(1), jnp.zeros((3,)))
  with pytest.raises(ValueError, match="dt_min and dt_max"):
    snn.S4Layer(3, dt_min=0.1, dt_max=0.01, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(1, 7), (1, 1, 7), (3, 7), (2, 1, 7)])
def test_dense_pads_a_single_row_without_changing_it(shape):
  from ssmax.nn.dense import dense

  layer = nnx.Linear(7, 5, use_bias=True, rngs=nnx.Rngs(seeds.draw()))
  x = jax.random.normal(jax.random.key(seeds.draw()), shape)
  got = jax.jit(dense)(layer, x)
  assert got.shape == shape[:-1] + (5,)
  np.testing.assert_allclose(got, layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 7), (1, 1, 7), (3, 7), (2, 5, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_product_matches_a_float64_product_in_the_input_dtype(shape, dtype):
  from ssmax.nn.dense import product

  x = jax.random.normal(jax.random.key(seeds.draw()), shape).astype(dtype)
  kernel = jax.random.normal(jax.random.key(seeds.draw()), (7, 5))  # float32, cast to x's dtype
  got = jax.jit(product)(x, kernel)
  assert got.shape == shape[:-1] + (5,) and got.dtype == dtype
  want = (np.asarray(x.astype(jnp.float32), np.float64)
          @ np.asarray(kernel.astype(dtype).astype(jnp.float32), np.float64))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32), np.float64), want, rtol=tol,
                             atol=tol)
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 7\), the rows of kernel"):
    product(x[..., :5], kernel)
  with pytest.raises(ValueError, match=r"kernel must have rank 2 \(k, n\)"):
    product(x, kernel[None])
  with pytest.raises(ValueError, match="x must have a floating-point dtype"):
    product(jnp.ones(shape, jnp.int32), kernel)


@pytest.mark.parametrize("shape", [(1, 7), (1, 1, 7), (3, 7), (2, 5, 7)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_dense_split_matches_a_float64_product(shape, use_bias, dtype):
  from ssmax.nn.dense import dense_split

  layer = nnx.Linear(7, 9, use_bias=use_bias, dtype=dtype, rngs=nnx.Rngs(seeds.draw()))
  if use_bias:
    layer.bias[...] = jax.random.normal(jax.random.key(seeds.draw()), (9,))
  x = jax.random.normal(jax.random.key(seeds.draw()), shape)
  parts = jax.jit(dense_split, static_argnums=2)(layer, x, (4, 2, 3))
  # float64 reference from the operands as the layer sees them (cast to its compute dtype)
  cast = (lambda a: np.asarray(a)) if dtype is None else (
      lambda a: np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32)))
  want = cast(x).astype(np.float64) @ cast(layer.kernel[...]).astype(np.float64)
  if use_bias:
    want = want + cast(layer.bias[...]).astype(np.float64)
  tol = 1e-5 if dtype is None else 2e-2  # bf16 output rounding
  for got, (a, b) in zip(parts, [(0, 4), (4, 6), (6, 9)]):
    assert got.shape == shape[:-1] + (b - a,) and got.dtype == layer(x).dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want[..., a:b], rtol=tol, atol=tol)
  with pytest.raises(ValueError, match="sizes must be positive integers summing to out_features=9"):
    dense_split(layer, x, (4, 4))
  with pytest.raises(ValueError, match="sizes must be positive"):
    dense_split(layer, x, (9, 0))
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=7\)"):
    dense_split(layer, x[..., :5], (9,))
  with pytest.raises(ValueError, match="x must have a floating-point dtype"):
    dense_split(layer, jnp.ones(shape, jnp.int32), (9,))
