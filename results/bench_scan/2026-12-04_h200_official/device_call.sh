#!/bin/bash
# Device call 1 (2026-12-04, session 28): the GPU check of the working tree while the official
# kernel builds, then the official kernel's times and memory, then bench_scan side by side.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv > $OUT/status.txt
(cd .carry && MAMBA_CSRC=$PWD/mamba_csrc/csrc/selective_scan MAX_JOBS=14 timeout 300 \
  python3 -c "import official_scan_bench as o; o.build()" > $OUT/build.log 2>&1; \
  echo "build rc=$? ${SECONDS}s" >> $OUT/status.txt) &
BUILD=$!
timeout 280 python3 -m pytest -m gpu tests/kernels/test_scan_gpu.py -n 2 -q > $OUT/check.log 2>&1
echo "check rc=$? ${SECONDS}s" >> $OUT/status.txt
wait $BUILD
(cd .carry && MAMBA_CSRC=$PWD/mamba_csrc/csrc/selective_scan timeout 90 python3 official_mem.py \
  > $OUT/official.log 2>&1; echo "official rc=$? ${SECONDS}s" >> $OUT/status.txt)
timeout $((575 - SECONDS)) python3 -m benchmarks.bench_scan --backends=pallas,jla,associative \
  --rounds=2 --iters=20 --out_dir=$OUT/bench > $OUT/bench.log 2>&1
echo "bench rc=$? ${SECONDS}s" >> $OUT/status.txt
tar -czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
