#!/usr/bin/env bash
# Device call for issues 15/16 on the layer shapes: the `layers` suite (grouped_mm, triton recompute 100) under
# graphs twice back to back, `moebench compare` of the two, then under eager once; into $OUT.
#   usage (carry .whl .gitcommit): bash scripts/gpu_layers.sh [max_time_s]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown) MOEBENCH_GIT_DIRTY=${MOEBENCH_GIT_DIRTY:-unknown}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOEBENCH_TRITON_CACHE=/tmp/triton_tune.json
OUT=${OUT:-out}; mkdir -p "$OUT"
MT=${1:-1.5}
SEL=(--suite layers -b grouped_mm,triton -x recompute=0 --max-time "$MT" --device cuda --no-report)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv > "$OUT/nvidia-smi.txt"
for run in graphs-a graphs-b; do
  start=$(date +%s)
  timeout 170 python3 -m moebench run "${SEL[@]}" --exec graphs --out "$OUT/layers-$run.jsonl" > "$OUT/layers-$run.log" 2>&1
  echo "== $run: exit $? in $(( $(date +%s) - start )) s"
done
python3 -m moebench compare "$OUT/layers-graphs-a.jsonl" "$OUT/layers-graphs-b.jsonl" --format md > "$OUT/compare-graphs.md" 2> "$OUT/compare-graphs.err"
echo "== compare graphs-a graphs-b: exit $?"; tail -3 "$OUT/compare-graphs.md"; cat "$OUT/compare-graphs.err"
start=$(date +%s)
timeout 170 python3 -m moebench run "${SEL[@]}" --exec eager --out "$OUT/layers-eager.jsonl" > "$OUT/layers-eager.log" 2>&1
echo "== eager: exit $? in $(( $(date +%s) - start )) s"
for f in graphs-a eager; do grep -E "^ *(ok|noisy|skipped|mismatch|oom|timeout|failed) " "$OUT/layers-$f.log" | cut -c1-200; done
