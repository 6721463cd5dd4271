#!/usr/bin/env bash
# Device call 2 of 2 for the SonicMoE peer backend (the device has no internet and a ~60 MiB carry per call; call 1,
# scripts/sonic_stage.sh, staged .sonicA/ in /tmp): add .sonicB/'s second half of the libs-base wheel, check it, and
# install every wheel into /tmp/site (--target: no .pth, so cutlass is linked in at the top and python_packages is put
# on the path too). opt/ holds fallbacks (cuda-bindings, cuda-pathfinder, einops) installed only if not importable.
# Writes /tmp/sonic_env.sh; use: source /tmp/sonic_env.sh   usage (carry .sonicB .sonicC .whl): bash scripts/sonic_install.sh
set -euo pipefail
STAGE=${SONIC_STAGE:-/tmp/sonic_stage}; SITE=${SONIC_SITE:-/tmp/site}
[[ -f $STAGE/SHA256 ]] || { echo "sonic_install: no $STAGE: run scripts/sonic_stage.sh first (same warm machine)" >&2; exit 1; }
[[ -f .sonicB/cutlass_libs.part_ab ]] && cp .sonicB/cutlass_libs.part_ab "$STAGE/"
# .sonicC/ (carried beside .sonicB: .sonicA plus the tree outgrew one 64 MiB carry) holds the cuda-bindings fallback
if compgen -G ".sonicC/*.whl" > /dev/null; then mkdir -p "$STAGE/opt" && cp .sonicC/*.whl "$STAGE/opt/"; fi
cd "$STAGE"
whl=$(awk '{print $2}' SHA256)
sha256sum -c --quiet SHA256 >/dev/null 2>&1 || { cat cutlass_libs.part_a? > "$whl" && sha256sum -c --quiet SHA256; } \
  || { rm -f "$whl"; echo "sonic_install: $whl: sha256 mismatch (.sonicB not carried?)" >&2; exit 1; }
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
pipi ./*.whl
has() { PYTHONPATH=$SITE python3 -c "import $1" 2>/dev/null; }
has cuda.bindings.driver || { echo "sonic_install: no cuda.bindings, installing opt/'s"; pipi opt/cuda_*.whl; }
has einops || pipi opt/einops-*.whl
# link cutlass in at the top too, so PYTHONPATH=$SITE alone (scripts/gpu.sh) finds it (it finds its lib/ via realpath)
[[ -d $SITE/cutlass && ! -L $SITE/cutlass ]] || ln -sfn nvidia_cutlass_dsl/python_packages/cutlass "$SITE/cutlass"
cd - > /dev/null
# quack autotunes each GEMM shape on first use; keep its choices (and its .o cache in /tmp) for later calls
echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/python_packages:$PWD QUACK_CACHE_AUTOTUNING=1 QUACK_HOME=/tmp" \
  > /tmp/sonic_env.sh
cat /tmp/sonic_env.sh
