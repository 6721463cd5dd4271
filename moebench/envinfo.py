"""The env block of a record: where and with what a case ran, plus the measured matmul ceiling."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import moebench

REPO = Path(__file__).resolve().parent.parent


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def git_state() -> dict:
    """Commit and dirty flag; MOEBENCH_GIT_COMMIT overrides (for copies of the tree without .git)."""
    if os.environ.get("MOEBENCH_GIT_COMMIT"):
        return {"git_commit": os.environ["MOEBENCH_GIT_COMMIT"],
                "git_dirty": os.environ.get("MOEBENCH_GIT_DIRTY", "unknown")}
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if dirty is None else bool(dirty)}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ceiling(device: torch.device | str | None = None) -> dict:
    """Dense matmul rate measured here and now, once per process and device type (the env block and MFU use the
    same measurement): bf16 8192^3 on CUDA, fp32 1024^3 on CPU (median of 10)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return _ceiling(kind)


@functools.cache
def _ceiling(kind: str) -> dict:
    import time

    device = torch.device(kind)
    if device.type == "cuda":
        n, dt = 8192, torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    else:
        n, dt = 1024, torch.float32
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"tflops": 2 * n**3 / med / 1e12, "what": f"{str(dt).replace('torch.', '')} {n}^3 matmul, median of 10"}


def copy_bandwidth(device: torch.device | str | None = None) -> dict:
    """Device memory bandwidth measured here and now, once per process and device type: a device-to-device copy
    (CUDA: 2 GiB; CPU: 64 MiB), bytes read plus bytes written over the median time of 10 (CPU: 5)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return _copy_bandwidth(kind)


@functools.cache
def _copy_bandwidth(kind: str) -> dict:
    import time

    cuda = kind == "cuda"
    nbytes, reps = (2 * 2**30, 10) if cuda else (64 * 2**20, 5)
    src = torch.randn(nbytes // 4, device=kind)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"gbps": 2 * nbytes / med / 1e9,
            "what": f"{nbytes / 2**20:.0f} MiB device copy, (read + write) / median of {reps}"}


@functools.cache
def static() -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = None
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_v,
        "python": sys.version.split()[0], "host": platform.node(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "moebench": moebench.__version__,
        # switches that change what a backend runs (e.g. MOEBENCH_TRITON_TUNE=0: untuned configs), as set
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOEBENCH_TRITON_")},
    } | git_state()


def collect(device: str) -> dict:
    env = dict(static()) | {"device": device}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 2), "driver": _driver(),
                "gpu_count": torch.cuda.device_count(), "sm_count": p.multi_processor_count}
    c, bw = ceiling(device), copy_bandwidth(device)
    env |= {"ceiling_tflops": c["tflops"], "ceiling": c["what"], "copy_gbps": bw["gbps"], "copy": bw["what"]}
    return env


def parent(device: str) -> dict:
    """The env block of a record written by the parent process (timeouts, crashed workers): no measurements."""
    return static() | {"device": device}
