"""The prefill's causal depthwise conv + SiLU at 1.4B batch 64 (b, l, d) = (64, 2048, 4096), bf16,
forward only: the mixer's formulation and variants, one jitted call each (median of 20 x 5)."""
import json, os, sys
import jax, jax.numpy as jnp
from jax import lax
sys.path.insert(0, os.getcwd())
from benchmarks import harness

b, l, d, k = int(os.environ.get("CS_B", 64)), 2048, int(os.environ.get("CS_D", 4096)), 4
f32, bf = jnp.float32, jnp.bfloat16
xs = jax.random.normal(jax.random.key(0), (b, l, d), bf)
left = jnp.zeros((b, k - 1, d), bf)
w = jax.random.normal(jax.random.key(1), (k, d), f32) * 0.5
bias = jax.random.normal(jax.random.key(2), (d,), f32) * 0.1

def mixer(xs, left, w, bias):  # as MambaMixer._conv then silu
  history = jnp.concatenate([left, xs], axis=1).astype(f32)
  kk = w.astype(bf).astype(f32)
  u = sum(history[:, j:j + l] * kk[j] for j in range(k)) + bias.astype(bf).astype(f32)
  return jax.nn.silu(u.astype(bf))

def silu_f32(xs, left, w, bias):  # SiLU before the cast to bf16
  history = jnp.concatenate([left, xs], axis=1).astype(f32)
  kk = w.astype(bf).astype(f32)
  u = sum(history[:, j:j + l] * kk[j] for j in range(k)) + bias.astype(bf).astype(f32)
  return jax.nn.silu(u).astype(bf)

def silu_manual(xs, left, w, bias):  # u * 1 / (1 + exp(-u)) with the fast reciprocal
  history = jnp.concatenate([left, xs], axis=1).astype(f32)
  kk = w.astype(bf).astype(f32)
  u = sum(history[:, j:j + l] * kk[j] for j in range(k)) + bias.astype(bf).astype(f32)
  u = u.astype(bf).astype(f32)
  return (u * lax.reciprocal(1.0 + jnp.exp(-u))).astype(bf)

def shifted(xs, left, w, bias):  # no concatenation: taps of xs shifted with pad
  x32 = xs.astype(f32)
  kk = w.astype(bf).astype(f32)
  u = x32 * kk[k - 1]
  for j in range(k - 1):
    s = k - 1 - j
    u = u + jnp.pad(x32[:, :l - s], ((0, 0), (s, 0), (0, 0))) * kk[j]
  u = u + bias.astype(bf).astype(f32)
  return jax.nn.silu(u.astype(bf))

def cudnn(xs, left, w, bias):  # grouped convolution
  history = jnp.concatenate([left, xs], axis=1)
  u = lax.conv_general_dilated(history, w.astype(bf)[:, None, :], (1,), "VALID",
                               dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=d)
  return jax.nn.silu((u.astype(f32) + bias).astype(bf))

def copy(xs, left, w, bias):  # bandwidth reference: read xs, write a bf16 array
  return (xs.astype(f32) * 1.5).astype(bf)

out = []
ref = jax.jit(mixer)(xs, left, w, bias).astype(f32)
for name, fn in [("copy", copy), ("mixer", mixer), ("silu_f32", silu_f32),
                 ("silu_manual", silu_manual), ("shifted", shifted), ("cudnn", cudnn)]:
  try:
    f = jax.jit(fn)
    y = f(xs, left, w, bias)
    err = None if name == "copy" else float(jnp.max(jnp.abs(y.astype(f32) - ref)) / jnp.max(jnp.abs(ref)))
    s = harness.median_seconds(lambda: f(xs, left, w, bias), repeats=20, inner=5, warmup=2)
    row = dict(variant=name, ms=s * 1e3, GBps=2 * xs.nbytes / s / 1e9, rel_err=err)
  except Exception as e:
    row = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
  out.append(row)
  print(json.dumps(row), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"conv_study_{d}.json"), "w"), indent=1)
