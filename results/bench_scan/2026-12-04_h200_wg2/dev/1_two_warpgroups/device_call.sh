#!/bin/bash
# Device call 1 (2026-12-04): the two-warpgroup backward, GPU check + side-by-side timings.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt 2>&1
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
python3 -c "import jax, flax, pytest; print(jax.__version__, jax.devices())" >> $OUT/gpu.txt 2>&1
python3 -c "import xdist" >> $OUT/gpu.txt 2>&1 && N="-n 2" || N=""
echo "xdist: $N" >> $OUT/gpu.txt
SECONDS=0
timeout 170 python3 -m pytest -m gpu tests/kernels/test_scan_gpu.py $N -q -k "(130m-train and not packed) or 2x37 or 1x300 or 1x17" > $OUT/check1.log 2>&1
echo "check1 rc=$? ${SECONDS}s" >> $OUT/gpu.txt
timeout 280 python3 -m benchmarks.bench_scan --backends=pallas,jla --rounds=2 --iters=20 \
  --configs="wg1:bwd_warpgroups=1;s8:sub=8;bs2:bwd_segments=2" --config_shapes=130m-train \
  --config_modes=fwdbwd --out_dir=$OUT/bench > $OUT/bench.log 2>&1
echo "bench rc=$? ${SECONDS}s" >> $OUT/gpu.txt
left=$((560 - SECONDS))
timeout $left python3 -m pytest -m gpu tests/kernels/test_scan_gpu.py $N -q -k "not ((130m-train and not packed) or 2x37 or 1x300 or 1x17)" > $OUT/check2.log 2>&1
echo "check2 rc=$? ${SECONDS}s" >> $OUT/gpu.txt
