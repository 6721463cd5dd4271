#!/usr/bin/env bash
# The GPU test tier on a lent GPU machine (the `device` tool), then the whole test suite there. Installs the carried
# wheels (.whl/: pydantic and its needs, which that image lacks), runs tests/gpu alone and serially (its timing
# checks need the GPU to themselves) into $OUT/gpu_tier.log, then `pytest -n 8` over everything into
# $OUT/pytest_gpu.log. Each step has a time limit, so the script ends within 9 minutes.
#   usage: scripts/gpu_tests.sh      (one GPU: nvidia-h200; the EP-over-NCCL test needs two: nvidia-h200-x2)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
# NVLink multicast off in everything started from here (the lent machines' rule; torchrun workers inherit it)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null || echo unknown) MOEBENCH_GIT_DIRTY=${MOEBENCH_GIT_DIRTY:-unknown}
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch as t, triton as tr, numpy as n; print(t.__version__, tr.__version__, n.__version__, t.cuda.device_count())" \
  | sed 's/^/torch triton numpy gpus: /' | tee "$OUT/versions.txt"
start=$(date +%s)
timeout -k 10 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$OUT/gpu_tier.log"
tier=${PIPESTATUS[0]}
timeout -k 10 260 python3 -m pytest -q -rs -p no:cacheprovider -n 8 2>&1 | tee "$OUT/pytest_gpu.log"
suite=${PIPESTATUS[0]}
echo "== gpu tier: exit $tier; whole suite: exit $suite (124: over its time limit); $(( $(date +%s) - start )) s"
[ "$tier" = 0 ] && [ "$suite" = 0 ]
