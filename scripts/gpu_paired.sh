#!/usr/bin/env bash
# `moebench paired` on a lent GPU (carry .whl): install the carried wheels, seed the Triton tuning cache from the
# committed one, run paired with the given arguments into $OUT/paired-<tag>.json and its log.
#   usage: scripts/gpu_paired.sh TAG PAIRED_ARGS...
#   e.g.   scripts/gpu_paired.sh mixtral -s layers -b grouped_mm,triton -m mixtral-layer -m layer/train -x recompute=0 -r 8
set -uo pipefail
tag=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown)
export MOEBENCH_GIT_DIRTY=0 COLUMNS=200
mkdir -p /root/.cache/moebench
[ -f /root/.cache/moebench/triton_tune.json ] || cp results/triton_dev/v8_tune.json /root/.cache/moebench/triton_tune.json
OUT=${OUT:-out}; mkdir -p "$OUT"
start=$(date +%s)
python3 -m moebench paired "$@" --device cuda -o "$OUT/paired-$tag.json" > "$OUT/paired-$tag.log" 2>&1
echo "== paired $tag: exit $? in $(( $(date +%s) - start )) s"; cat "$OUT/paired-$tag.log" | tail -30
cp /root/.cache/moebench/triton_tune.json "$OUT/triton_tune.json"
