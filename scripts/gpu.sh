#!/usr/bin/env bash
# Run moebench suites on a lent GPU machine (the `device` tool): install the carried wheels (.whl/: pydantic and
# its needs, which that image lacks), then run each suite into $OUT/<suite>.jsonl with its log.
#   usage: scripts/gpu.sh SUITE[:BACKENDS] ...     e.g. scripts/gpu.sh l4 h100:grouped_mm,triton
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
# the device's copy of the tree has no .git: the commit comes from .gitcommit (write `git rev-parse --short HEAD` there)
export MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown) MOEBENCH_GIT_DIRTY=${MOEBENCH_GIT_DIRTY:-unknown}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
for spec in "$@"; do
  suite=${spec%%:*}; backends=""; [[ $spec == *:* ]] && backends="--backends ${spec#*:}"
  start=$(date +%s)
  python3 -m moebench run --suite "$suite" $backends --device cuda --out "$OUT/$suite.jsonl" --no-report \
    > "$OUT/$suite.log" 2>&1
  echo "== $suite: exit $? in $(( $(date +%s) - start )) s"; grep -E "^ *(ok|skipped|mismatch|oom|timeout|failed) " "$OUT/$suite.log" | cut -c1-220
done
