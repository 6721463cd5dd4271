"""Config spaces and a small cached autotuner for the expert-block kernels.

A config is (BM, BN, BK, GROUP_M, num_warps, num_stages). The tuner times every config of a kernel the
first time it meets a key (kernel, D, F, E, K, token bucket, dtype, variant) on CUDA, keeps the fastest in
memory and in a JSON file (MOEBENCH_TRITON_CACHE, default ~/.cache/moebench/triton_tune.json), and never
runs at import time. MOEBENCH_TRITON_TUNE=0 takes each kernel's first config without timing.
Under the interpreter (CPU) there is nothing to tune: one small config is used.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import torch

Cfg = namedtuple("Cfg", "BM BN BK GROUP_M num_warps num_stages")

# first entry = default (used untuned); kept small: every entry costs a compile per variant on first use
CONFIGS = {
    "gate_up": [Cfg(128, 128, 64, 8, 8, 3), Cfg(128, 64, 64, 8, 4, 4), Cfg(64, 128, 64, 8, 4, 3),
                Cfg(128, 128, 64, 8, 8, 4)],
    # x[tok] pre-gathered (sorted rows), both operands by tensor descriptor; two 128x128 accumulators at 8 warps
    "gate_up_tma": [Cfg(128, 128, 64, 8, 8, 3), Cfg(128, 128, 64, 8, 8, 4), Cfg(128, 64, 64, 8, 4, 4),
                    Cfg(64, 128, 64, 8, 4, 4)],
    "down": [Cfg(128, 256, 64, 8, 8, 3), Cfg(128, 128, 64, 8, 4, 4), Cfg(128, 128, 64, 8, 8, 4),
             Cfg(64, 128, 64, 8, 4, 4)],
    "dx": [Cfg(128, 256, 64, 8, 8, 3), Cfg(128, 128, 64, 8, 4, 4), Cfg(128, 128, 64, 8, 8, 4),
           Cfg(64, 128, 64, 8, 4, 4)],
    "dact": [Cfg(128, 256, 64, 8, 8, 3), Cfg(128, 128, 64, 8, 4, 4), Cfg(128, 128, 64, 8, 8, 4)],
    "bwd_act": [Cfg(64, 128, 64, 8, 8, 3), Cfg(128, 64, 64, 8, 8, 3)],
    # dW: 4-warp 128x128 tiles won every shape on the H100 (8-warp 128x256 ran at 290-460 TFLOP/s, see notes)
    "wgrad": [Cfg(128, 128, 32, 8, 4, 5), Cfg(128, 128, 32, 8, 4, 7), Cfg(128, 128, 64, 8, 4, 4)],
    # both operands by tensor descriptor (TMA): 8-warp 128x256 tiles reach 600-730 TFLOP/s on the H100 where the
    # pointer-load kernels above stop near 500 (results/triton_dev/v6_wgrad_tma_probe_h100.log)
    "wgrad_sorted": [Cfg(128, 256, 64, 8, 8, 4), Cfg(128, 256, 64, 8, 8, 3), Cfg(256, 128, 64, 8, 8, 3),
                     Cfg(128, 128, 32, 8, 4, 5)],
    "wgrad_tma": [Cfg(128, 128, 32, 8, 4, 5), Cfg(128, 128, 64, 8, 4, 4)],
    # rows_gemm_tma_kernel (A rows sorted, both operands by descriptor): down, dA' (pre-gathered dy) and dX
    **{kind: [Cfg(128, 256, 64, 8, 8, 3), Cfg(128, 256, 64, 8, 8, 4), Cfg(256, 128, 64, 8, 8, 3),
              Cfg(128, 128, 64, 8, 4, 4)] for kind in ("down_tma", "dact_tma", "dx_tma")},
}
INTERPRET_CFG = Cfg(32, 32, 32, 2, 1, 1)
FP32_CFG = Cfg(64, 64, 32, 8, 4, 2)  # fp32 on CUDA is a correctness path (ieee dots): one config, untuned

_mem: dict[str, Cfg] = {}
_disk_loaded = False


def _cache_path() -> Path:
    return Path(os.environ.get("MOEBENCH_TRITON_CACHE", Path.home() / ".cache" / "moebench" / "triton_tune.json"))


def _device_tag() -> str:
    import triton
    return f"{torch.cuda.get_device_name()}|triton {triton.__version__}"


def _load_disk() -> None:
    global _disk_loaded
    _disk_loaded = True
    try:
        data = json.loads(_cache_path().read_text())
        _mem.update({k: Cfg(*v) for k, v in data.get(_device_tag(), {}).items()})
    except (OSError, ValueError, TypeError):
        pass


def _save_disk() -> None:
    path = _cache_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    tag = _device_tag()
    data.setdefault(tag, {}).update({k: list(v) for k, v in _mem.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def token_bucket(T: int) -> int:
    return 1 << max(T - 1, 0).bit_length()


def _time(fn, reps: int = 3) -> float:
    fn()  # compile + warm
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e))
    return best


def pick(kind: str, key: tuple, launch, interpret: bool, fp32: bool = False) -> Cfg:
    """The config for kernel `kind` at `key`; `launch(cfg)` runs the kernel once with that config."""
    if interpret:
        return INTERPRET_CFG
    if fp32:
        return FP32_CFG
    configs = CONFIGS[kind]
    if os.environ.get("MOEBENCH_TRITON_TUNE", "1") == "0" or len(configs) == 1:
        return configs[0]
    if not _disk_loaded:
        _load_disk()
    skey = f"{kind}|" + "|".join(map(str, key))
    if skey in _mem:
        return _mem[skey]
    timings = {}
    for cfg in configs:
        try:
            timings[cfg] = _time(lambda: launch(cfg))  # noqa: B023 - called at once
        except Exception as exc:
            if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc):
                raise
    best = min(timings, key=timings.get)
    _mem[skey] = best
    _save_disk()
    return best


def tuned() -> dict[str, Cfg]:
    """Everything chosen so far in this process (for notes and results)."""
    return dict(_mem)
