"""Decode step variants of the Mamba LM (bf16 params, greedy, 64 steps per call): ms per step,
kernels per step (profiler), and the optimized HLO of each variant's loop."""
import functools, json, os, sys
import jax, jax.numpy as jnp
from jax import lax
from flax import nnx
sys.path.insert(0, os.getcwd())
from benchmarks import harness, trace
from benchmarks.lm_sizes import build
from benchmarks.profile_decode import decode_loop
from ssmax.nn import mixer as mixer_mod
from ssmax.nn.dense import dense
from ssmax.scan.step import selective_state_update
from ssmax.nn.mixer import MixerState

ORIG = mixer_mod.MambaMixer.step
f32 = jnp.float32

def step_variant(self, state, x, *, one_inproj=False, dt_full=False, conv_sum=False, mosaic=False, rows=None):
  d = self.d_inner
  if one_inproj:
    xz = dense(self.in_proj, x)
    xs, z = xz[:, :d], xz[:, d:]
  else:
    xs, z = self._in_proj(x)
  conv = jnp.concatenate([state.conv[:, 1:], xs[:, None, :].astype(state.conv.dtype)], axis=1)
  w = self.conv1d.kernel[...][:, 0, :]
  if conv_sum:
    u = sum(conv[:, j].astype(f32) * w[j].astype(self.dtype).astype(f32) for j in range(self.d_conv))
    if self.conv1d.bias is not None:
      u = u + self.conv1d.bias[...].astype(self.dtype).astype(f32)
    u = jax.nn.silu(u).astype(self.dtype)
  else:
    u = jnp.einsum("bkd,kd->bd", conv.astype(self.dtype), w.astype(self.dtype))
    if self.conv1d.bias is not None:
      u = u + self.conv1d.bias[...].astype(self.dtype)
    u = jax.nn.silu(u)
  x_dbl = dense(self.x_proj, u)
  r, n = self.dt_rank, self.d_state
  if mosaic:
    from ssmax.pallas import state_update_mosaic as sm
    y, h = sm.step(state.ssm, u, x_dbl, -jnp.exp(self.A_log[...].astype(f32)), off_b=r, off_c=r + n,
                   rank=r, delta_proj=self.dt_proj.kernel[...], D=self.D[...], z=z,
                   delta_bias=self.dt_proj.bias[...], delta_softplus=True, rows=rows)
    return dense(self.out_proj, y.astype(self.dtype)), MixerState(conv, h)
  if dt_full:
    delta = jnp.dot(x_dbl[:, :r], self.dt_proj.kernel[...].astype(x_dbl.dtype))
    proj = None
  else:
    delta, proj = x_dbl[:, :r], self.dt_proj.kernel[...]
  y, h = selective_state_update(
      state.ssm, u, delta, -jnp.exp(self.A_log[...].astype(f32)),
      x_dbl[:, r:r + n], x_dbl[:, r + n:], D=self.D[...], z=z,
      delta_bias=self.dt_proj.bias[...], delta_softplus=True,
      delta_proj=proj, backend=self.scan_backend)
  return dense(self.out_proj, y.astype(self.dtype)), MixerState(conv, h)

VARIANTS = {
  "base": None,
  "one_inproj": dict(one_inproj=True),
  "dt_full": dict(dt_full=True),
  "conv_sum": dict(conv_sum=True),
  "mosaic": dict(mosaic=True),
  "mosaic_r1": dict(mosaic=True, rows=1),
  "mosaic_r2": dict(mosaic=True, rows=2),
  "mosaic_r4": dict(mosaic=True, rows=4),
  "mosaic_r8": dict(mosaic=True, rows=8),
}
VARIANTS = {k: VARIANTS[k] for k in os.environ.get("DS_VARIANTS", ",".join(VARIANTS)).split(",")}
out_dir = os.environ.get("OUT", ".")
rows = []
for size in os.environ.get("DS_SIZES", "130m").split(","):
  model = build("mamba", size, dtype=jnp.bfloat16)
  for batch in [int(b) for b in os.environ.get("DS_BATCHES", "64").split(",")]:
    cache = model.init_cache(batch)
    token = jnp.zeros((batch,), jnp.int32)
    ref = None
    for name, kw in VARIANTS.items():
      mixer_mod.MambaMixer.step = ORIG if kw is None else (lambda self, s, x, kw=kw: step_variant(self, s, x, **kw))
      steps = 64
      loop = decode_loop(model, steps)
      c2, tok = loop(cache, token)
      jax.block_until_ready(tok)
      s = harness.median_seconds(lambda: loop(cache, token), repeats=7)
      kernels, _ = trace.device_kernels(lambda: loop(cache, token))
      same = None if ref is None else bool(jnp.all(tok == ref))
      if ref is None: ref = tok
      row = dict(size=size, batch=batch, variant=name, ms_per_step=s * 1e3 / steps,
                 kernels_per_step=len(kernels) / steps, last_token_same_as_base=same)
      agg = {}
      for k in kernels:
        key = trace.short_name(k.hlo_op or k.name)
        a = agg.setdefault(key, [0, 0.0]); a[0] += 1; a[1] += k.duration_ns / 1e3
      row["kernels"] = sorted(([k, c / steps, us / steps] for k, (c, us) in agg.items()), key=lambda r: -r[2])[:40]
      rows.append(row); print(json.dumps(row), flush=True)
      if os.environ.get("DS_HLO") and size == "130m" and batch == 64:
        graphdef, st = nnx.split(model)
        txt = jax.jit(lambda st, c, t: nnx.merge(graphdef, st).step(c, t)).lower(st, cache, token).compile().as_text()
        open(os.path.join(out_dir, f"hlo_{size}_{batch}_{name}.txt"), "w").write(txt)
json.dump(rows, open(os.path.join(out_dir, "decode_study.json"), "w"), indent=1)
