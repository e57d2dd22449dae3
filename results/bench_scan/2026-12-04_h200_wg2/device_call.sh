#!/bin/bash
# Device call 5 (2026-12-04): the committed default (two-warpgroup backward, one-warpgroup
# pre-pass, backward segments from the cost model): side by side, then the GPU check.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
SECONDS=0
timeout 230 python3 -m benchmarks.bench_scan --backends=pallas,jla,associative --rounds=2 --iters=20 \
  --out_dir=$OUT/bench > $OUT/bench.log 2>&1
echo "bench rc=$? ${SECONDS}s" > $OUT/status.txt
timeout $((380 - SECONDS)) python3 -m pytest -m gpu tests/kernels/test_scan_gpu.py -n 2 -q -k "long-32k or 130m-train or 2x1000" > $OUT/check.log 2>&1
echo "check rc=$? ${SECONDS}s" >> $OUT/status.txt
