"""Issue 18, defects 5 and 11: a segmentation fault and a hang, each run in a subprocess under a
timeout so that a regression fails this test instead of killing or stalling the suite.

5. ``jax.grad`` of ``ssmax.parallel.selective_scan`` without ``jax.jit`` (4 CPU devices) killed
   the process with SIGSEGV; the entry points now run their ``shard_map`` under ``jax.jit``.
11. A jitted forward of a multi-layer S4D model at length >= 2048 hung on a 2-core CPU: two FFTs
   run at once waited on each other in XLA's thread pool. ``lti.causal_conv`` now puts every FFT
   on one dependency chain on the CPU; :func:`test_s4d_ffts_form_one_chain` checks that in the
   model's jaxpr, the subprocess test runs the case that hung.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jcore

from ssmax.nn import MambaConfig, MambaLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script: str, timeout: float, devices: int = 1) -> str:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
  assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
  return out.stdout


def test_eager_grad_of_parallel_selective_scan():
  out = _run("""
      import jax, jax.numpy as jnp, numpy as np
      from ssmax import parallel
      r = np.random.default_rng(0)
      b, l, d, n = 4, 16, 3, 2
      u = jnp.asarray(r.normal(size=(b, l, d)), jnp.float32)
      dl = jnp.asarray(r.uniform(.1, .5, (b, l, d)), jnp.float32)
      A = -jnp.asarray(r.uniform(.5, 1, (d, n)), jnp.float32)
      B = jnp.asarray(r.normal(size=(b, l, n)), jnp.float32)
      C = jnp.asarray(r.normal(size=(b, l, n)), jnp.float32)
      for data, seq in ((1, 4), (2, 2), (4, 1)):
        mesh = parallel.make_mesh(data=data, seq=seq)
        f = lambda u: parallel.selective_scan(mesh, u, dl, A, B, C, backend="associative").sum()
        g = jax.grad(f)(u)  # eager: this was the segmentation fault
        gj = jax.jit(jax.grad(f))(u)
        print(data, seq, float(jnp.abs(g - gj).max()))
      """, timeout=300, devices=4)
  lines = out.split("\n")[:3]
  assert [l.split()[:2] for l in lines] == [["1", "4"], ["2", "2"], ["4", "1"]], out
  assert all(float(l.split()[2]) == 0.0 for l in lines), out


def _fft_chain(jaxpr):
  """For each FFT equation of ``jaxpr`` (nested jaxprs walked, in program order), the set of
  earlier FFTs its input depends on."""
  ffts = []

  def walk(jaxpr, in_deps):
    deps = {v: d for v, d in zip(jaxpr.invars, in_deps)}
    get = lambda v: deps.get(v, frozenset()) if isinstance(v, jcore.Var) else frozenset()
    for eqn in jaxpr.eqns:
      ins = frozenset().union(*(get(v) for v in eqn.invars))
      subs = [p for p in eqn.params.values() if isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr))]
      if eqn.primitive.name == "fft":
        ffts.append(ins)
        outs = [ins | {len(ffts) - 1}] * len(eqn.outvars)
      elif len(subs) == 1 and len(_inner(subs[0]).invars) == len(eqn.invars):
        outs = walk(_inner(subs[0]), [get(v) for v in eqn.invars])
        if len(outs) != len(eqn.outvars):
          outs = [frozenset().union(*outs)] * len(eqn.outvars)
      else:
        for sub in subs:  # loops and branches: conservatively, everything depends on all inputs
          walk(_inner(sub), [ins] * len(_inner(sub).invars))
        outs = [ins | set(range(len(ffts)))] * len(eqn.outvars) if subs else [ins] * len(
            eqn.outvars)
      deps.update(zip(eqn.outvars, outs))
    return [get(v) for v in jaxpr.outvars]

  walk(jaxpr.jaxpr, [frozenset()] * len(jaxpr.jaxpr.invars))
  return ffts


def _inner(j):
  return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def test_s4d_ffts_form_one_chain():
  """Every FFT of a 3-layer S4D model's forward waits for the one before it (on the CPU), so no
  two run at once. Before the fix each layer's kernel FFT depended on the parameters only."""
  model = MambaLM(MambaConfig(d_model=8, n_layer=3, vocab_size=11, d_state=2, ssm="s4d"),
                  rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state,
                                                                  jnp.zeros((2, 16), jnp.int32))
  ffts = _fft_chain(jaxpr)
  assert len(ffts) == 9  # kernel, input and inverse FFT per layer
  for j in range(1, len(ffts)):
    assert j - 1 in ffts[j], f"FFT {j} can run at the same time as FFT {j - 1}"


def test_multilayer_s4d_forward_at_length_2048_finishes():
  """The case that hung every time on a 2-core CPU (2 layers, 64 channels, batch 4, length 2048)."""
  out = _run("""
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from ssmax.nn import MambaConfig, MambaLM
      model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=16, d_state=4, ssm="s4d"),
                      rngs=nnx.Rngs(0))
      logits = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((4, 2048), jnp.int32))
      print(bool(jnp.isfinite(logits).all()), logits.shape)
      """, timeout=180)
  assert out.split("\n")[0] == "True (4, 2048, 16)", out
