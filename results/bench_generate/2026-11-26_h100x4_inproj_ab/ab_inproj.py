"""A/B for the next GPU session: in_proj as two products (x and z written contiguous, no slice
copies) against one product sliced. Usage: python .kdev/ab_inproj.py {one,split} <profile_step flags>"""
import sys
import jax.numpy as jnp
from absl import app
from ssmax.nn import mixer


def split_in_proj(self, x):
  if not self.gated or x.ndim != 3:
    return ORIGINAL(self, x)
  k = self.in_proj.kernel[...]
  dt = self.in_proj.dtype or x.dtype
  x = x.astype(dt)
  xs = jnp.dot(x, k[:, :self.d_inner].astype(dt))
  z = jnp.dot(x, k[:, self.d_inner:].astype(dt))
  if self.in_proj.bias is not None:
    b = self.in_proj.bias[...].astype(dt)
    xs, z = xs + b[:self.d_inner], z + b[self.d_inner:]
  return xs, z


ORIGINAL = mixer.MambaMixer._in_proj
variant = sys.argv.pop(1)
if variant == "split":
  mixer.MambaMixer._in_proj = split_in_proj
import importlib  # noqa: E402
target = importlib.import_module(sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("--")
                                 else "benchmarks.profile_step")
app.run(target.main)
