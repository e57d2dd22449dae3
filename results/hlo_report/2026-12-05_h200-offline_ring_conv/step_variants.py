"""Kernels a decode step launches (130M Mamba, batch 64, compiled for an H200 on a CPU) for variants
of MambaMixer.step that were tried and not kept. Run from the repository root:

    python results/hlo_report/2026-12-05_h200-offline_ring_conv/step_variants.py

It compiles a jitted lax.scan of 16 greedy steps (not generate's loop, so its counts sit one below
hlo_report's) and writes step_variants.json beside itself. Variants:
  ring           main's step with conv_slot = t % d_conv
  shift          main's step with conv_slot = None (the conv state shifted, as before ed64c25)
  softplus_in_dt ring, with softplus(Δ's product in float32 + bias) computed before the state update
  old_plus_new   ring, the conv reading the old ring and the new input instead of the updated ring
"""
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

if os.environ.get("STEP_VARIANTS_WORKER") is None:  # re-run in a compiling process
  sys.path.insert(0, os.getcwd())
  from benchmarks import sass, xla_offline

  tools = sass.toolchain(pathlib.Path.home() / ".cache" / "ssmax-sass")
  env = dict(xla_offline.compile_env(tools), STEP_VARIANTS_WORKER="1")
  env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.getcwd()])
  sys.exit(subprocess.run([sys.executable, __file__], env=env).returncode)

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from benchmarks import lm_sizes, xla_offline
from ssmax.nn import mixer as mixer_mod
from ssmax.nn.dense import dense, product
from ssmax.scan.step import selective_state_update

ORIG = mixer_mod.MambaMixer.step


def variant_step(self, state, x, conv_slot=None, *, variant):
  xs, z = self._in_proj(x)
  new = xs[:, None, :].astype(state.conv.dtype)
  conv = lax.dynamic_update_slice_in_dim(state.conv, new, conv_slot, axis=1)
  window = jnp.roll(conv, -(conv_slot + 1), axis=1)
  if variant == "old_plus_new":
    slots = jnp.arange(state.conv.shape[1])[None, :, None]
    window = jnp.roll(jnp.where(slots == conv_slot, new, state.conv), -(conv_slot + 1), axis=1)
  u = jnp.einsum("bkd,kd->bd", window.astype(self.dtype),
                 self.conv1d.kernel[...][:, 0, :].astype(self.dtype))
  u = jax.nn.silu(u + self.conv1d.bias[...].astype(self.dtype))
  x_dbl = dense(self.x_proj, u)
  r, n = self.dt_rank, self.d_state
  if variant == "softplus_in_dt":
    dt = jax.nn.softplus(jnp.dot(x_dbl[:, :r], self.dt_proj.kernel[...],
                                 preferred_element_type=jnp.float32)
                         + self.dt_proj.bias[...].astype(jnp.float32))
    kw = dict(delta_bias=None, delta_softplus=False)
  else:
    dt = product(x_dbl[:, :r], self.dt_proj.kernel[...])
    kw = dict(delta_bias=self.dt_proj.bias[...], delta_softplus=True)
  y, h = selective_state_update(state.ssm, u, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)),
                                x_dbl[:, r:r + n], x_dbl[:, r + n:], D=self.D[...], z=z,
                                backend=self.scan_backend, **kw)
  return dense(self.out_proj, y.astype(self.dtype)), mixer_mod.MixerState(conv, h)


sharding = xla_offline.replicated_sharding("h200")
model = nnx.eval_shape(lambda: lm_sizes.build("mamba", "130m", dtype=jnp.bfloat16))
cache = jax.eval_shape(lambda: model.init_cache(64))
token = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=sharding)
rows = []
for variant in ("ring", "shift", "softplus_in_dt", "old_plus_new"):
  mixer_mod.MambaMixer.step = ORIG if variant in ("ring", "shift") else (
      lambda self, s, x, conv_slot=None, v=variant: variant_step(self, s, x, conv_slot, variant=v))

  def decode(model, cache, token, variant=variant):
    def body(carry, t):
      cache, token = carry
      slot = None if variant == "shift" else t % model.config.d_conv
      logits, cache = model.step(cache, token, conv_slot=slot)
      return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None
    return lax.scan(body, (cache, token), jnp.arange(16, dtype=jnp.int32))[0]

  hlo = jax.jit(decode).lower(xla_offline.abstract(model, sharding),
                              xla_offline.abstract(cache, sharding), token).compile().as_text()
  ks = xla_offline.kernels(hlo, xla_offline.loop_body(hlo, 16))
  summary = xla_offline.summary(ks, xla_offline.bandwidth("h200"))
  rows.append(dict(variant=variant, kernels=summary["kernels"], by_family=summary["by_family"]))
  print(variant, summary["kernels"], flush=True)
(HERE / "step_variants.json").write_text(json.dumps(rows, indent=1))
