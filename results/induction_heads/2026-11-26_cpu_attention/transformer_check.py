"""CPU check that the Induction Heads Transformer baseline can learn the task (session 23).
Usage, from the repository root: PYTHONPATH=. python transformer_check.py LENGTH STEPS POSITIONS N_HEAD LR
Prints every 500 steps: positions, heads, lr, step, last loss, mean train accuracy of the 500, seconds."""
import sys, time, jax, jax.numpy as jnp, optax
from flax import nnx
from experiments import tasks
from experiments.transformer import TransformerLM, TransformerConfig
length, vocab, steps = int(sys.argv[1]), 16, int(sys.argv[2])
pos, n_head, lr = sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
task = tasks.InductionHeads(length=length, vocab_size=vocab)
model = TransformerLM(TransformerConfig(vocab_size=vocab, d_model=64, n_layer=2, n_head=n_head, positions=pos, max_len=length), rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
@nnx.jit
def step(model, opt, key):
  b = task.sample(key, 32)
  def loss_fn(m):
    lg = m(b.inputs).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, b.targets)
    acc = (jnp.argmax(lg, -1) == b.targets)
    return (ce * b.mask).sum() / b.mask.sum(), (acc * b.mask).sum() / b.mask.sum()
  (l, a), g = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  opt.update(model, g)
  return l, a
key = jax.random.key(1); t = time.time(); la = []
for i in range(steps):
  l, a = step(model, opt, jax.random.fold_in(key, i)); la.append(float(a))
  if (i + 1) % 500 == 0: print(pos, n_head, lr, i + 1, round(float(l), 3), round(sum(la[-500:]) / 500, 3), round(time.time() - t), flush=True)
