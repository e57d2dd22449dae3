"""The Mamba paper's synthetic experiments: Selective Copying and Induction Heads.

* :mod:`experiments.tasks`: the data generators (pure JAX, seeded by a key).
* :mod:`experiments.models`: the paper's Table 1 rows built from :mod:`ssmax.nn`.
* :mod:`experiments.transformer`: a Transformer LM baseline with a KV cache and greedy generation.
* :mod:`experiments.train`: the training loop shared by both tasks.
* :mod:`experiments.cli`, :mod:`experiments.plotting`: the entry points' flags; plots and Markdown
  tables (the benchmarks use these too).
* ``python -m experiments.selective_copying`` and ``python -m experiments.induction_heads``: the
  entry points; they write to ``runs/``.

The benchmarks (timing, memory, generation, decode profile) are in :mod:`benchmarks`.
"""
