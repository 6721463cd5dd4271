#!/usr/bin/env bash
# Keep SonicMoE's (quack's) compile and autotune caches between lent machines, which keep nothing: its first call per
# shape compiles and benchmarks every GEMM config for minutes (h100_sonic at olmoe outlasted one 600 s call:
# results/h100/h100_sonic.log, "interrupted").
#   save (in the run call, after the suite):  bash scripts/sonic_cache.sh save     -> $OUT/quack_cache.tgz (if <= 14 MiB)
#   restore (call 1, carry .sonicA .quack_cache): bash scripts/sonic_cache.sh restore
# Locally, keep the fetched tgz in the git-ignored .quack_cache/. Autotune results live in $QUACK_HOME/.quack/cache
# (QUACK_HOME=/tmp, see scripts/sonic_install.sh), compiled objects in /tmp/$USER/quack_cache (quack's default).
set -euo pipefail
USER_NAME=$(id -un)
case "${1:-}" in
  save)
    OUT=${OUT:-out}; mkdir -p "$OUT"
    dirs=(); for d in .quack "$USER_NAME/quack_cache"; do [[ -d /tmp/$d ]] && dirs+=("$d"); done
    [[ ${#dirs[@]} -gt 0 ]] || { echo "sonic_cache: nothing to save"; exit 0; }
    tar czf /tmp/quack_cache.tgz -C /tmp "${dirs[@]}"
    size=$(stat -c %s /tmp/quack_cache.tgz)
    if (( size <= 14 * 1024 * 1024 )); then cp /tmp/quack_cache.tgz "$OUT/"; echo "sonic_cache: saved $size bytes";
    else tar czf "$OUT/quack_cache.tgz" -C /tmp .quack 2>/dev/null || true
         echo "sonic_cache: $size bytes with compiled objects: saved the autotune results only"; fi ;;
  restore)
    if compgen -G ".quack_cache/*.tgz" > /dev/null; then
      for f in .quack_cache/*.tgz; do tar xzf "$f" -C /tmp; done
      echo "sonic_cache: restored $(find /tmp/.quack "/tmp/$USER_NAME/quack_cache" -type f 2>/dev/null | wc -l) files"
    else echo "sonic_cache: no .quack_cache/ carried"; fi ;;
  *) echo "usage: scripts/sonic_cache.sh save|restore" >&2; exit 2 ;;
esac
