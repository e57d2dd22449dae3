"""Benchmarks of ssmax on a device: one shared harness, one script per benchmark.

* :mod:`benchmarks.harness`: timing, peak memory, OOM handling, tables, the results folders and
  their index.
* :mod:`benchmarks.lm_sizes`: the LM shapes the generation and training benchmarks share, and the
  AdamW training step.
* :mod:`benchmarks.trace`: profiler traces read into kernels by category (from the compiled HLO).
* ``python -m benchmarks.bench_scan``: the selective scan, every backend (and the jla peer kernel).
* ``benchmarks/official_scan_memory.py``: the official CUDA kernel's times and peak memory on the
  same machine (PyTorch; for ``bench_scan --official_json``).
* ``python -m benchmarks.bench_train``: training-step throughput and peak memory of the 130M LM.
* ``python -m benchmarks.bench_generate``: generation, Mamba against a Transformer with a KV cache.
* ``python -m benchmarks.bench_parallel``: one device against N (sequence and data parallel).
* ``python -m benchmarks.profile_decode``: where a decode step spends its time.
* ``python -m benchmarks.profile_step``: where a training step and a prefill spend their time.
* ``python -m benchmarks.profile_scan``: the kernels of one scan call, per backend.
* ``python -m benchmarks.sass_report``: the Mosaic GPU kernels compiled for sm_90a without a
  GPU: registers, shared memory, occupancy, the inner loops' instruction mix.
* ``python -m benchmarks.hlo_report``: the kernels a decode step launches, from XLA's compile
  for an H100 / H200 without a GPU (:mod:`benchmarks.xla_offline`).

Results go to ``results/<benchmark>/<date>_<device>/``; ``results/<benchmark>/INDEX.json`` names
the current run. The kernel's GPU correctness check is ``pytest -m gpu tests/kernels``.
"""
