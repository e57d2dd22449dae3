#!/bin/bash
# Device call 2 (2026-12-04, session 28): decode-shaped matrix products at 1.4B (XLA default,
# exhaustive tiling search, cuBLAS, JAX's Hopper Mosaic GPU matmul), then the 1.4B decode step
# profiled with XLA's default and with the exhaustive tiling search.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
SECONDS=0
timeout 230 python3 .carry/gemm_study.py > $OUT/gemm.log 2>&1
echo "gemm rc=$? ${SECONDS}s" >> $OUT/status.txt
timeout 150 python3 -m benchmarks.profile_decode --sizes=1.4b --batches=16,64 --backends=xla \
  --kernel_micro=false --check=false --out_dir=$OUT/pd_default > $OUT/pd_default.log 2>&1
echo "pd_default rc=$? ${SECONDS}s" >> $OUT/status.txt
XLA_FLAGS=--xla_gpu_exhaustive_tiling_search=true timeout $((570 - SECONDS)) python3 -m benchmarks.profile_decode \
  --sizes=1.4b --batches=16,64 --backends=xla --kernel_micro=false --check=false \
  --out_dir=$OUT/pd_exhaustive > $OUT/pd_exhaustive.log 2>&1
echo "pd_exhaustive rc=$? ${SECONDS}s" >> $OUT/status.txt
tar -czf $OUT/pd.tgz -C $OUT pd_default pd_exhaustive && rm -rf $OUT/pd_default $OUT/pd_exhaustive
