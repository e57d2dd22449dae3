"""The Mamba paper's synthetic experiments: Selective Copying and Induction Heads.

* :mod:`experiments.tasks`: the data generators (pure JAX, seeded by a key).
* :mod:`experiments.models`: the paper's Table 1 rows built from :mod:`ssmax.nn`.
* :mod:`experiments.transformer`: a Transformer LM baseline with a KV cache.
* :mod:`experiments.train`: the training loop shared by both tasks.
* ``python -m experiments.selective_copying`` and ``python -m experiments.induction_heads``: the
  entry points.
"""
