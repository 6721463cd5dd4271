#!/usr/bin/env bash
# Device call for the execution modes (issue 15): the smoke cases first (scripts/gpu_smoke.py); when its graphs
# cases ran, the l4 suite under eager and graphs and a paired graphs run at moeforge-medium, into $OUT.
#   usage (carry .whl): bash scripts/gpu_exec.sh [max_time_s]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown) MOEBENCH_GIT_DIRTY=${MOEBENCH_GIT_DIRTY:-unknown}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOEBENCH_TRITON_CACHE=/tmp/triton_tune.json
OUT=${OUT:-out}; mkdir -p "$OUT"
MT=${1:-2}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 300 python3 scripts/gpu_smoke.py 1.0 2>&1 | grep -v "^W1130\|^  warnings.warn" | tee "$OUT/smoke.log"
if ! grep -q "^ok .*moeforge-small | triton | model/train.* graphs" "$OUT/smoke.log"; then
  echo "smoke: triton graphs at model level did not run; stopping here"; exit 1
fi
start=$(date +%s)
timeout 330 python3 -m moebench run --suite l4 --exec eager,graphs --max-time "$MT" --device cuda \
  --out "$OUT/l4.jsonl" --no-report > "$OUT/l4.log" 2>&1
echo "== l4: exit $? in $(( $(date +%s) - start )) s"
grep -E "^ *(ok|noisy|skipped|mismatch|oom|timeout|failed) " "$OUT/l4.log" | cut -c1-230
start=$(date +%s)
timeout 120 python3 -m moebench paired -s l4 -e graphs -b grouped_mm,triton -m "moeforge-medium |" -m model/train \
  -r 10 --steps 5 -d cuda -o "$OUT/paired-medium-graphs.json" > "$OUT/paired.log" 2>&1
echo "== paired: exit $? in $(( $(date +%s) - start )) s"; tail -12 "$OUT/paired.log"
