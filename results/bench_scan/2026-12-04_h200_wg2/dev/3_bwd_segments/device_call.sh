#!/bin/bash
# Device call 3 (2026-12-04): backward sequence segments with two warpgroups, 130m-train.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
timeout 400 python3 -m benchmarks.bench_scan --backends=pallas,jla --shapes=130m-train --modes=fwdbwd --rounds=3 --iters=20 \
  --configs="bs3:bwd_segments=3;bs4:bwd_segments=4;bs6:bwd_segments=6;bs8:bwd_segments=8;bs16:bwd_segments=16" \
  --out_dir=$OUT/bench > $OUT/bench.log 2>&1
timeout 150 python3 -m benchmarks.profile_scan --shapes=130m-train --modes=fwdbwd --backends=pallas \
  --configs="bs4:bwd_segments=4;bs8:bwd_segments=8" --out_dir=$OUT/profile > $OUT/profile.log 2>&1
