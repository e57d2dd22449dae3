"""Packed documents (``segment_ids``) through the nn layers: a packed row equals its documents run
one by one, by the float64 loops of test_nn (mixer, LM, S4D, S4) and by the layers themselves
(carried and returned states, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmax import nn as snn
from ssmax.nn.s4 import S4DLayer, S4Layer
from test_nn import (TINY, f64, lm, lti_recurrence, mixer, mixer_params, perturb, rel_err,
                     s4_system, s4d_system)

LENGTH = 37
# Row 0: documents of length 1 first and inside, one of 2 (shorter than the conv window), one of
# length 1 last; row 1: two documents.
STARTS = ([1, 2, 4, 20, 36], [23])


def packed_ids(length=LENGTH, starts=STARTS):
  ids = np.zeros((len(starts), length), np.int32)
  for b, row in enumerate(starts):
    for s in row:
      ids[b, s:] += 3  # any change of id starts a document
  return ids


def documents(ids_row):
  starts = [0] + [t for t in range(1, len(ids_row)) if ids_row[t] != ids_row[t - 1]]
  return list(zip(starts, starts[1:] + [len(ids_row)]))


def per_document(fn, x, ids):
  """``fn(x[b:b+1, s:e])`` for every document, assembled like ``x``'s first two axes."""
  x = np.asarray(x)  # slices of a NumPy array: no compilation per document length
  rows = [np.concatenate([np.asarray(fn(x[b:b + 1, s:e])) for s, e in documents(ids[b])], axis=1)
          for b in range(ids.shape[0])]
  return np.concatenate(rows, axis=0)


@pytest.mark.parametrize("gated,backend,d_conv", [(True, "sequential", 4),
                                                  (False, "associative", 3)])
def test_packed_mixer_equals_documents_float64(gated, backend, d_conv):
  config = snn.MambaConfig(d_model=5, n_layer=1, d_state=3, d_conv=d_conv, expand=2, dt_rank=2,
                           gated=gated, scan_backend=backend)
  m = perturb(snn.MambaMixer(config, rngs=nnx.Rngs(1)), 2)
  x = jax.random.normal(jax.random.key(3), (2, LENGTH, 5))
  ids = packed_ids()
  y = jax.jit(lambda m, x, s: m(x, segment_ids=s))(m, x, ids)
  p = mixer_params(m)
  want = per_document(lambda d: mixer(p, f64(d), d_state=3, dt_rank=2, gated=gated), x, ids)
  assert y.shape == (2, LENGTH, 5)
  assert rel_err(y, want) < 2e-4
  if not gated:  # without boundaries the mixer reads across: the masks make them equal
    assert rel_err(jax.jit(lambda m, x: m(x))(m, x), want) > 1e-2


@pytest.mark.parametrize("ssm", ["selective", "s4d"])
def test_packed_mixer_states(ssm):
  # The given state feeds each row's first document only; the returned state is that of its last.
  config = snn.MambaConfig(d_model=5, n_layer=1, d_state=4, d_conv=4, expand=2, ssm=ssm,
                           s4d_init="lin", scan_backend="associative")
  m = perturb(snn.MambaMixer(config, rngs=nnx.Rngs(4)), 5)
  x = jax.random.normal(jax.random.key(6), (2, LENGTH, 5))
  ids = packed_ids(LENGTH, ([5, 9, 10, 30], [5, 30]))  # first and last documents alike per row
  zero = m.init_state(2)
  state = snn.MixerState(zero.conv + jax.random.normal(jax.random.key(7), zero.conv.shape),
                         zero.ssm + 0.5)
  run = jax.jit(lambda m, x, st, s: m(x, st, return_state=True, segment_ids=s))
  y, last = run(m, x, state, ids)
  alone = jax.jit(lambda m, x, st: m(x, st, return_state=True))
  first, _ = alone(m, x[:, :5], state)
  assert rel_err(y[:, :5], first) < 1e-5
  want, want_last = alone(m, x[:, 30:], m.init_state(2))
  assert rel_err(y[:, 30:], want) < 1e-5
  assert rel_err(last.conv, want_last.conv) < 1e-6
  assert rel_err(last.ssm, want_last.ssm) < 1e-5


def test_packed_lm_equals_documents_float64():
  model = perturb(snn.MambaLM(snn.MambaConfig(**TINY), rngs=nnx.Rngs(8)), 9)
  tokens = jax.random.randint(jax.random.key(10), (2, LENGTH), 0, 37)
  ids = packed_ids()
  logits = jax.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, ids)
  want = per_document(lambda d: lm(model, d), np.asarray(tokens), ids)
  assert logits.shape == (2, LENGTH, 40)
  assert rel_err(logits, want) < 2e-4


def test_packed_lm_gradients_equal_documents_one_by_one():
  model = perturb(snn.MambaLM(snn.MambaConfig(**TINY, scan_backend="associative"),
                              rngs=nnx.Rngs(11)), 12)
  tokens = np.asarray(jax.random.randint(jax.random.key(13), (2, LENGTH + 1), 0, 37))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  ids = packed_ids()
  graphdef, params = nnx.split(model)

  def nll(params, inputs, targets, segment_ids=None):
    logits = nnx.merge(graphdef, params)(inputs, segment_ids=segment_ids)[..., :37]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  packed = jax.jit(jax.grad(nll))(params, inputs, targets, ids)
  # The documents one by one, in one call: one document per row, right-padded, the padding left
  # out of the loss (causal: it cannot reach the document's positions).
  docs = [(b, s, e) for b in range(2) for s, e in documents(ids[b])]
  rows = np.zeros((len(docs), LENGTH), np.int32)
  row_targets = np.zeros((len(docs), LENGTH), np.int32)
  weights = np.zeros((len(docs), LENGTH), np.float32)
  for i, (b, s, e) in enumerate(docs):
    rows[i, :e - s], row_targets[i, :e - s], weights[i, :e - s] = inputs[b, s:e], targets[b, s:e], 1

  def nll_alone(params):
    logits = nnx.merge(graphdef, params)(rows)[..., :37]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(jnp.take_along_axis(logp, row_targets[..., None], axis=-1)[..., 0] * weights)

  alone = jax.jit(jax.grad(nll_alone))(params)
  flat_packed = dict(nnx.to_flat_state(packed))
  for path, want in nnx.to_flat_state(alone):
    got = flat_packed[path]
    assert rel_err(got.get_value(), want.get_value()) < 1e-4, path


@pytest.mark.parametrize("init", ["lin", "real"])
def test_packed_s4d_layer_equals_documents_float64(init):
  layer = perturb(S4DLayer(5, d_state=4, init=init, rngs=nnx.Rngs(14)), 15)
  u = jax.random.normal(jax.random.key(16), (2, LENGTH, 5))
  ids = packed_ids()
  dt = jnp.complex64 if init == "lin" else jnp.float32
  h0 = (0.3 * jax.random.normal(jax.random.key(17), (2, 5, layer.modes))).astype(dt)
  y, last = jax.jit(lambda m, u, h, s: m(u, h, return_state=True, segment_ids=s))(
      layer, u, h0, ids)
  system = s4d_system(layer)
  u, h0 = np.asarray(u), np.asarray(h0)
  for b in range(2):
    docs = documents(ids[b])
    for i, (s, e) in enumerate(docs):
      want, want_last = lti_recurrence(*system, f64(u[b:b + 1, s:e]),
                                       h0[b:b + 1] if i == 0 else None)
      assert rel_err(y[b:b + 1, s:e], want) < 2e-4, (b, s, e)
    assert rel_err(last[b:b + 1], want_last) < 2e-4
  assert last.dtype == dt


def test_packed_s4_layer_equals_documents_float64():
  layer = perturb(S4Layer(5, d_state=4, rngs=nnx.Rngs(18)), 19, scale=0.05)
  u = jax.random.normal(jax.random.key(20), (2, LENGTH, 5))
  ids = packed_ids()
  y = jax.jit(lambda m, u, s: m(u, segment_ids=s))(layer, u, ids)
  system = s4_system(layer)
  want = per_document(lambda d: lti_recurrence(*system, f64(d))[0], u, ids)
  assert rel_err(y, want) < 2e-4


def test_segment_ids_errors_name_the_argument():
  model = snn.MambaLM(snn.MambaConfig(**TINY), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids must have shape \(2, 6\) \(batch, length\), "
                                       r"like tokens's first two axes; got \(2, 5\)"):
    model(tokens, segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids must have an integer dtype; got float32"):
    model.prefill(tokens, segment_ids=jnp.zeros((2, 6), jnp.float32))
  with pytest.raises(ValueError, match=r"segment_ids must have rank 2"):
    model.layers[0].mixer(jnp.zeros((2, 6, 5)), segment_ids=jnp.zeros((6,), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids must have shape \(2, 6\)"):
    S4DLayer(5, d_state=4, rngs=nnx.Rngs(0))(jnp.zeros((2, 6, 5)),
                                             segment_ids=jnp.zeros((1, 6), jnp.int32))
