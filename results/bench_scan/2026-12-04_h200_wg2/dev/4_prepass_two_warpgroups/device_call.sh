#!/bin/bash
# Device call 4 (2026-12-04): GPU check, side-by-side timings and kernel profile of the
# two-warpgroup backward with its sequence segments (pre-pass with two warpgroups too).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
SECONDS=0
timeout 240 python3 -m pytest -m gpu tests/kernels/test_scan_gpu.py -n 2 -q > $OUT/check.log 2>&1
echo "check rc=$? ${SECONDS}s" > $OUT/status.txt
timeout 270 python3 -m benchmarks.bench_scan --backends=pallas,jla,associative --rounds=2 --iters=20 \
  --configs="bs1:bwd_segments=1;bs16:bwd_segments=16" --config_shapes=130m-train,long-32k \
  --config_modes=fwdbwd --out_dir=$OUT/bench > $OUT/bench.log 2>&1
echo "bench rc=$? ${SECONDS}s" >> $OUT/status.txt
timeout $((580 - SECONDS)) python3 -m benchmarks.profile_scan --shapes=130m-train,long-32k --modes=fwdbwd \
  --backends=pallas,jla --calls=5 --out_dir=$OUT/profile > $OUT/profile.log 2>&1
echo "profile rc=$? ${SECONDS}s" >> $OUT/status.txt
