#!/bin/bash
# Device call 3 (2026-12-04, session 28): the 1.4B decode step with cuBLAS products (XLA's Triton
# GEMMs off), then the 1.4B generation call at batch 64, Mamba and our Transformer, XLA's default,
# and Mamba with cuBLAS products.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
SECONDS=0
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 100 python3 -m benchmarks.profile_decode \
  --sizes=1.4b --batches=16,64 --backends=xla --kernel_micro=false --check=false \
  --out_dir=$OUT/pd_cublas > $OUT/pd_cublas.log 2>&1
echo "pd_cublas rc=$? ${SECONDS}s" >> $OUT/status.txt
timeout 200 python3 -m benchmarks.bench_generate --sizes=1.4b --models=mamba,transformer \
  --batches=64 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_default \
  > $OUT/gen_default.log 2>&1
echo "gen_default rc=$? ${SECONDS}s" >> $OUT/status.txt
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout $((425 - SECONDS)) python3 -m benchmarks.bench_generate \
  --sizes=1.4b --models=mamba --batches=64 --attention=cudnn --repeats=2 --warmup=2 --split_prefill \
  --out_dir=$OUT/gen_cublas > $OUT/gen_cublas.log 2>&1
echo "gen_cublas rc=$? ${SECONDS}s" >> $OUT/status.txt
tar -czf $OUT/runs.tgz -C $OUT pd_cublas gen_default gen_cublas && rm -rf $OUT/pd_cublas $OUT/gen_default $OUT/gen_cublas
