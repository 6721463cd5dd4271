#!/usr/bin/env bash
# Device call 1 of 2 for the SonicMoE peer backend (see scripts/sonic_install.sh): stage the carried .sonicA/ (small
# wheels, opt/ fallbacks, first half of the nvidia-cutlass-dsl-libs-base wheel, its SHA256) in /tmp, which a warm
# machine keeps until call 2.   usage (carry .sonicA [.quack_cache]): bash scripts/sonic_stage.sh
set -euo pipefail
STAGE=${SONIC_STAGE:-/tmp/sonic_stage}
[[ -f .sonicA/SHA256 && -f .sonicA/cutlass_libs.part_aa ]] || { echo "sonic_stage: .sonicA/ not carried" >&2; exit 1; }
rm -rf "$STAGE" && mkdir -p "$STAGE" && cp -r .sonicA/. "$STAGE/"
echo "sonic_stage: staged $(du -sh "$STAGE" | cut -f1) in $STAGE: $(cd "$STAGE" && ls | tr '\n' ' ')"
# quack's caches from an earlier machine (scripts/sonic_cache.sh), when carried too
if [[ -d .quack_cache ]]; then bash scripts/sonic_cache.sh restore; fi
