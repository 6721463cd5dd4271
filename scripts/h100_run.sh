#!/usr/bin/env bash
# The h100 suite on a lent H100 in calls of at most ~9 minutes: each call resumes the partial results file carried in
# the tree (results/h100/partial.jsonl, if any), stops itself with SIGTERM before the call's limit (the runner keeps
# every finished record), and leaves the file and its log under $OUT.   usage: scripts/h100_run.sh BACKENDS [SECONDS]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOEBENCH_GIT_COMMIT=$(cat .gitcommit) MOEBENCH_GIT_DIRTY=0
mkdir -p /root/.cache/moebench
[ -f /root/.cache/moebench/triton_tune.json ] || cp results/triton_dev/v8_tune.json /root/.cache/moebench/triton_tune.json
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.txt"
[ -f results/h100/partial.jsonl ] && cp results/h100/partial.jsonl "$OUT/layers.jsonl"
[ -f results/h100/partial.log ] && cp results/h100/partial.log "$OUT/h100.log"
start=$(date +%s)
timeout -s TERM "${2:-540}" python3 -m moebench run --suite layers --backends "$1" --device cuda --out "$OUT/layers.jsonl" \
  --resume --no-report >> "$OUT/h100.log" 2>&1
echo "== exit $? in $(( $(date +%s) - start )) s; records: $(wc -l < "$OUT/layers.jsonl")"
grep -E "^ *(ok|skipped|mismatch|oom|timeout|failed) " "$OUT/h100.log" | tail -n +1 | cut -c1-160 | tail -40
cp /root/.cache/moebench/triton_tune.json "$OUT/triton_tune.json"
