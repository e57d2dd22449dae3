"""The one place that resolves backends: enum members and their strings are the same backend,
"auto" resolves off the GPU to the associative scan, and bad names are errors naming the argument."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import oracle
import seeds
import ssmax
from ssmax.scan import dispatch


# The kernel (slow in interpret mode) has its own tests in tests/kernels.
@pytest.mark.parametrize("backend", [b for b in ssmax.Backend if b is not ssmax.Backend.PALLAS])
def test_enum_members_and_strings_give_the_same_result(backend):
  kw = oracle.random_inputs(seeds.draw(), b=1, l=7, d=5, n=3)
  by_enum = ssmax.selective_scan(**kw, backend=backend)
  by_name = ssmax.selective_scan(**kw, backend=backend.value)
  np.testing.assert_array_equal(np.asarray(by_enum), np.asarray(by_name))


def test_auto_resolves_off_the_gpu_to_associative():
  kw = oracle.random_inputs(seeds.draw(), b=1, l=7, d=5, n=3)
  x = ssmax.scan.check_inputs(**kw)
  on_gpu = jax.default_backend() == "gpu"
  want = dispatch.Backend.PALLAS if on_gpu else dispatch.Backend.ASSOCIATIVE
  assert dispatch.resolve("auto", x) is want
  assert dispatch.resolve_step("auto") is dispatch.Backend.SEQUENTIAL
  assert dispatch.resolve_step(ssmax.Backend.PALLAS) is dispatch.Backend.PALLAS


def test_a_bad_backend_names_the_argument():
  with pytest.raises(ValueError, match=r"scan_backend must be one of .*; got 'cuda'"):
    dispatch.parse("cuda", "scan_backend")
  with pytest.raises(ValueError, match=r"backend must be one of"):
    ssmax.selective_scan(**oracle.random_inputs(0, b=1, l=3, d=2, n=1), backend="triton")


def test_first_kernel_call_does_not_retrace_the_caller():
  # A fresh interpreter, so that nothing has imported the kernels yet: a jitted function whose
  # first trace reaches the fused kernel must not trace (and lower, ~50 s for a training step on
  # a GPU) a second time on its second call.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, ssmax
      traces = []
      @jax.jit
      def f(u, delta, A, B, C):
        traces.append(None)
        return ssmax.selective_scan(u, delta, A, B, C, backend="pallas")
      b, l, d, n = 1, 5, 3, 2
      k = jax.random.split(jax.random.key(0), 4)
      args = (jax.random.normal(k[0], (b, l, d)), jax.nn.softplus(jax.random.normal(k[1], (b, l, d))),
              -jnp.ones((d, n)), jax.random.normal(k[2], (b, l, n)), jax.random.normal(k[3], (b, l, n)))
      f(*args); f(*args)
      print(len(traces))
      """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-1] == "1"
