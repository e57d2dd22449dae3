#!/bin/bash
# Device call 4 (2026-12-04, session 28): generation at the acceptance batches (64, 128), 130M and
# 1.4B, Mamba against our Transformer, one process per size.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
SECONDS=0
timeout 150 python3 -m benchmarks.bench_generate --sizes=130m --models=mamba,transformer \
  --batches=64,128 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_130m \
  > $OUT/gen_130m.log 2>&1
echo "gen_130m rc=$? ${SECONDS}s" >> $OUT/status.txt
timeout $((400 - SECONDS)) python3 -m benchmarks.bench_generate --sizes=1.4b --models=mamba,transformer \
  --batches=64,128 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_1.4b \
  > $OUT/gen_1.4b.log 2>&1
echo "gen_1.4b rc=$? ${SECONDS}s" >> $OUT/status.txt
tar -czf $OUT/runs.tgz -C $OUT gen_130m gen_1.4b && rm -rf $OUT/gen_130m $OUT/gen_1.4b
