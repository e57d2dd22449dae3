import numpy as np, jax, jax.numpy as jnp
from ssmax.pallas import state_update_mosaic as sm
def ref(h, u, dlow, W, A, B, C, D, z, bias):
  f = lambda a: np.asarray(a, np.float64)
  dt = np.logaddexp(0, f(dlow) @ f(W) + f(bias))
  hn = np.exp(dt[..., None] * f(A)) * f(h) + (dt * f(u))[..., None] * f(B)[:, None]
  y = (np.sum(hn * f(C)[:, None], -1) + f(D) * f(u)) * f(z) / (1 + np.exp(-f(z)))
  return y, hn
b, d, n, r = 6, 256, 5, 7
k = jax.random.split(jax.random.key(0), 10)
h = jax.random.normal(k[0], (b, d, n)); u = jax.random.normal(k[1], (b, d), jnp.bfloat16)
x = jax.random.normal(k[2], (b, r + 2 * n), jnp.bfloat16)
W = (jax.random.normal(k[3], (r, d)) * 0.3).astype(jnp.bfloat16); A = -jnp.exp(jax.random.normal(k[4], (d, n)) * 0.5)
D = jax.random.normal(k[5], (d,)); z = jax.random.normal(k[6], (b, d), jnp.bfloat16); bias = jax.random.normal(k[7], (d,)) - 1
for (b, d, n, r, rows) in [(6, 256, 5, 7, 1), (6, 256, 5, 7, 3), (5, 384, 16, 48, None)] + ([(64, 1536, 16, 48, None), (128, 4096, 16, 128, None)] if jax.default_backend() == 'gpu' else []):
  k = jax.random.split(jax.random.key(b), 10)
  h = jax.random.normal(k[0], (b, d, n)); u = jax.random.normal(k[1], (b, d), jnp.bfloat16)
  x = jax.random.normal(k[2], (b, r + 2 * n), jnp.bfloat16)
  W = (jax.random.normal(k[3], (r, d)) * 0.3).astype(jnp.bfloat16); A = -jnp.exp(jax.random.normal(k[4], (d, n)) * 0.5)
  D = jax.random.normal(k[5], (d,)); z = jax.random.normal(k[6], (b, d), jnp.bfloat16); bias = jax.random.normal(k[7], (d,)) - 1
  y, hn = sm.step(h, u, x, A, off_b=r, off_c=r + n, rank=r, delta_proj=W, D=D, z=z, delta_bias=bias, delta_softplus=True, rows=rows, interpret=jax.default_backend() != "gpu")
  wy, wh = ref(h, u, x[:, :r], W, A, x[:, r:r+n], x[:, r+n:], D, z, bias)
  print(b, d, n, r, rows, y.dtype, np.max(np.abs(np.asarray(y, np.float64) - wy)) / np.max(np.abs(wy)), np.max(np.abs(np.asarray(hn) - wh)) / np.max(np.abs(wh)))
