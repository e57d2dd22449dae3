#!/bin/bash
# Device call 5 (2026-12-04, session 28): the 1.4B prefill at batch 64 under the JAX profiler.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
SECONDS=0
timeout 200 python3 -m benchmarks.profile_step --workloads=prefill --size=1.4b --prefill_batches=64 \
  --repeats=5 --out_dir=$OUT/prefill > $OUT/prefill.log 2>&1
echo "prefill rc=$? ${SECONDS}s" >> $OUT/status.txt
