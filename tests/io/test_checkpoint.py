"""Orbax training checkpoints: what is restored equals, bit for bit, what was saved."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssmax.io import checkpoint
from ssmax.nn import MambaConfig, MambaLM

CONFIG = MambaConfig(d_model=12, n_layer=2, vocab_size=29, d_state=3, d_conv=3)


def _model(seed, config=CONFIG):
  """A MambaLM with random parameters (built abstractly and filled from NumPy: no compiles)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), state))


def _optimizer(model):
  return nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def _randomize(module, seed):
  """Fills every array of ``module``'s state (AdamW's moments and step count included) with
  fresh random values, so that a restore of the wrong array cannot pass."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.asarray(rng.integers(1, 1000, x.shape), x.dtype)
    return jnp.asarray(rng.normal(size=x.shape), x.dtype)

  nnx.update(module, jax.tree.map(fill, nnx.state(module)))


def _leaves(module):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))]


def _assert_same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_model_and_optimizer_round_trip(tmp_path):
  model = _model(0)
  optimizer = _optimizer(model)
  _randomize(optimizer, 0)
  path = checkpoint.save(tmp_path, model, optimizer, step=1)
  assert path == tmp_path / "1" and path.is_dir()

  fresh = _model(1)
  fresh_opt = _optimizer(fresh)
  assert not np.array_equal(_leaves(fresh)[0], _leaves(model)[0])
  assert checkpoint.restore(tmp_path, fresh, fresh_opt) == 1
  _assert_same(fresh, model)
  _assert_same(fresh_opt, optimizer)
  assert int(fresh_opt.step[...]) == int(optimizer.step[...]) > 0


def test_latest_step_and_max_to_keep(tmp_path):
  models = [_model(s) for s in range(3)]
  for step, m in zip((5, 10, 20), models):
    checkpoint.save(tmp_path, m, step=step, max_to_keep=2)
  assert checkpoint.latest_step(tmp_path) == 20
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["10", "20"]
  target = _model(7)
  assert checkpoint.restore(tmp_path, target, step=10) == 10
  _assert_same(target, models[1])
  assert checkpoint.restore(tmp_path, target) == 20
  _assert_same(target, models[2])


def test_restore_casts_to_the_target_dtype(tmp_path):
  model = _model(0)
  checkpoint.save(tmp_path, model, step=0)
  target = _model(1, MambaConfig(**{**CONFIG.__dict__, "param_dtype": jnp.bfloat16}))
  checkpoint.restore(tmp_path, target)
  got = np.asarray(target.layers[1].mixer.x_proj.kernel[...])
  want = np.asarray(model.layers[1].mixer.x_proj.kernel[...])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))


def test_latest_step_of_empty_directory(tmp_path):
  assert checkpoint.latest_step(tmp_path) is None


# Errors, one per message.


@pytest.mark.parametrize("step", [-1, 1.0, True])
def test_error_bad_step(tmp_path, step):
  with pytest.raises(ValueError, match="step must be a non-negative int"):
    checkpoint.save(tmp_path, _model(0), step=step)


def test_error_bad_max_to_keep(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be a positive integer; got 0"):
    checkpoint.save(tmp_path, _model(0), step=0, max_to_keep=0)


def test_error_step_exists(tmp_path):
  checkpoint.save(tmp_path, _model(0), step=3)
  with pytest.raises(ValueError, match="step 3 already exists"):
    checkpoint.save(tmp_path, _model(0), step=3)


def test_error_not_a_module(tmp_path):
  with pytest.raises(ValueError, match="model must be a flax.nnx.Module; got dict"):
    checkpoint.save(tmp_path, {}, step=0)


def test_error_not_an_optimizer(tmp_path):
  with pytest.raises(ValueError, match="optimizer must be a flax.nnx.Optimizer or None; got "
                     "GradientTransformationExtraArgs"):
    checkpoint.save(tmp_path, _model(0), optax.adam(1e-3), step=0)


def test_error_missing_directory(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    checkpoint.restore(tmp_path / "nothing", _model(0))


def test_error_no_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="holds no checkpoint"):
    checkpoint.restore(tmp_path, _model(0))


def test_error_unknown_step(tmp_path):
  checkpoint.save(tmp_path, _model(0), step=2)
  with pytest.raises(ValueError, match=r"step 4 is not in .*; saved steps are \[2\]"):
    checkpoint.restore(tmp_path, _model(0), step=4)


def test_error_optimizer_not_saved(tmp_path):
  checkpoint.save(tmp_path, _model(0), step=0)
  model = _model(0)
  with pytest.raises(ValueError, match="saved without optimizer state"):
    checkpoint.restore(tmp_path, model, _optimizer(model))


@pytest.mark.parametrize("other", [dict(n_layer=3), dict(d_state=4)])
def test_error_structure_or_shape_differs(tmp_path, other):
  checkpoint.save(tmp_path, _model(0), step=0)
  target = _model(0, MambaConfig(**{**CONFIG.__dict__, **other}))
  with pytest.raises(ValueError, match="does not match the given model/optimizer structure"):
    checkpoint.restore(tmp_path, target)
