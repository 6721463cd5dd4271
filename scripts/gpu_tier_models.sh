#!/usr/bin/env bash
# Device call for issues 17/18/15: the GPU test tier, the `models` suite (grouped_mm and triton, uniform routing),
# the whole test suite with -n 8, and model-level torch.compile of moeforge-small (graph breaks); into $OUT.
#   usage (carry .whl .gitcommit): bash scripts/gpu_tier_models.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown) MOEBENCH_GIT_DIRTY=${MOEBENCH_GIT_DIRTY:-unknown}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOEBENCH_TRITON_CACHE=/tmp/triton_tune.json
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv
  python3 -c "import torch as t, triton as tr, numpy as n; print('torch', t.__version__, 'triton', tr.__version__, 'numpy', n.__version__, 'gpus', t.cuda.device_count())"; } > "$OUT/env.txt"
s=$(date +%s); timeout -k 10 140 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu > "$OUT/gpu_tier.log" 2>&1
echo "== gpu tier: exit $? in $(( $(date +%s) - s )) s"; tail -4 "$OUT/gpu_tier.log"
s=$(date +%s); timeout 130 python3 -m moebench run --suite models -b grouped_mm,triton -m uniform --max-time 1 --device cuda \
  --out "$OUT/models.jsonl" --no-report > "$OUT/models.log" 2>&1
echo "== models: exit $? in $(( $(date +%s) - s )) s"; grep -cE "^ *(ok|noisy) " "$OUT/models.log"
s=$(date +%s); timeout 90 python3 -m moebench run --suite l4 -b grouped_mm,triton -m "moeforge-small |" --exec compile \
  --max-time 2 --device cuda --out "$OUT/l4-compile.jsonl" --no-report > "$OUT/l4-compile.log" 2>&1
echo "== compile: exit $? in $(( $(date +%s) - s )) s"; grep -E "^ *(ok|noisy|failed|skipped) " "$OUT/l4-compile.log" | cut -c1-200
s=$(date +%s); timeout -k 10 120 python3 -m pytest -q -rs -p no:cacheprovider -n 8 > "$OUT/pytest_gpu.log" 2>&1
echo "== whole suite -n 8: exit $? in $(( $(date +%s) - s )) s"; tail -5 "$OUT/pytest_gpu.log"
cd "$OUT" && tar czf all.tgz --remove-files $(ls | grep -v all.tgz) && ls -la
