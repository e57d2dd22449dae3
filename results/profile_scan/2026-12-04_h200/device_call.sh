#!/bin/bash
# Device call 2 (2026-12-04): kernels of the 130m-train call, pallas (two and one backward
# warpgroups) and jla; Nsight Compute on the backward kernels if the machine has it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PWD/tests
cd "$(dirname "$0")/.."
python3 -m pip install --no-deps -q .carry/jax_linear_attention-0.1.0-py3-none-any.whl > $OUT/pip.log 2>&1
(which ncu nsys; ls -d /usr/local/cuda*/bin /opt/nvidia/nsight* 2>&1; ls /usr/local/cuda/bin 2>&1 | head -50) > $OUT/tools.txt 2>&1
SECONDS=0
timeout 200 python3 -m benchmarks.profile_scan --shapes=130m-train --modes=fwd,fwdbwd --backends=pallas,jla \
  --configs="wg1:bwd_warpgroups=1" --out_dir=$OUT/profile > $OUT/profile.log 2>&1
echo "profile rc=$? ${SECONDS}s" >> $OUT/tools.txt
NCU=$(which ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  cat > /tmp/one.py <<'PY'
import sys, jax, jax.numpy as jnp
from benchmarks.bench_scan import build_call
from benchmarks.scan_inputs import SHAPES, make_inputs
import ssmax
kw = make_inputs(jax.random.PRNGKey(1), *SHAPES["130m-train"], jnp.bfloat16)
be = sys.argv[1]
cfg = ssmax.pallas.Config(bwd_warpgroups=int(sys.argv[2])) if len(sys.argv) > 2 else None
call, _, _ = build_call(be, kw, "fwdbwd", cfg)
for _ in range(3): jax.block_until_ready(call())
PY
  for v in "pallas 2" "pallas 1" "jla"; do
    set -- $v
    timeout 150 $NCU --kernel-name regex:"bwd" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section InstructionStats --section LaunchStats --section Occupancy --section SchedulerStats \
      python3 /tmp/one.py $v > $OUT/ncu_${1}${2}.txt 2>&1
    echo "ncu $v rc=$? ${SECONDS}s" >> $OUT/tools.txt
  done
fi
