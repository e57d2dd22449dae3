#!/bin/bash
# Session 29 call 5: generation at 64/128, 130M and 1.4B, Mamba vs our Transformer (this commit);
# then 130M Mamba with the code before it (bb3d18d, put in .carry/old by
# `git archive bb3d18d ssmax experiments benchmarks | tar -x -C .carry/old`) in the same call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
SECONDS=0
PYTHONPATH=$PWD:$PWD/tests timeout 170 python3 -m benchmarks.bench_generate --sizes=130m --models=mamba,transformer \
  --batches=64,128 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_130m \
  > $OUT/gen_130m.log 2>&1
echo "gen_130m rc=$? ${SECONDS}s" >> $OUT/status.txt
(cd .carry/old && PYTHONPATH=$PWD timeout 100 python3 -m benchmarks.bench_generate --sizes=130m --models=mamba \
  --batches=64,128 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_130m_before \
  > $OUT/gen_130m_before.log 2>&1)
echo "gen_130m_before rc=$? ${SECONDS}s" >> $OUT/status.txt
PYTHONPATH=$PWD:$PWD/tests timeout $((540 - SECONDS)) python3 -m benchmarks.bench_generate --sizes=1.4b --models=mamba,transformer \
  --batches=64,128 --attention=cudnn --repeats=2 --warmup=2 --split_prefill --out_dir=$OUT/gen_1.4b \
  > $OUT/gen_1.4b.log 2>&1
echo "gen_1.4b rc=$? ${SECONDS}s" >> $OUT/status.txt
tar -czf $OUT/runs.tgz -C $OUT gen_130m gen_130m_before gen_1.4b && rm -rf $OUT/gen_130m $OUT/gen_130m_before $OUT/gen_1.4b
cat $OUT/status.txt; grep -h "batch" $OUT/gen_*.log | grep "tok/s"
