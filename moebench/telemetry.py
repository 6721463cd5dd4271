"""GPU clocks, power and throttle reasons sampled beside timed work (`nvidia-smi --loop-ms`), per time window.

Why: on the H100 one backend's steps can run at the power cap at lowered SM clocks while another's do not
(results/triton_dev/v8_smi_trace_h100.csv). A speed-up is then partly a power-state difference, and the
samples say so next to the timings. `Sampler` runs nvidia-smi in the background; `summary(windows)`
summarises the samples received inside (t0, t1) time.monotonic() windows (arrival time: a sample lags the GPU
by up to one period).
MOEBENCH_SMI names another executable with nvidia-smi's output format (tests use a stand-in).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

QUERY = "clocks.current.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL = 0x4, 0x8, 0x20  # nvidia-smi clocks_event_reasons bits


class Sampler:
    def __init__(self, period_ms: int = 100, gpu_index: int = 0):
        self.period_ms, self.gpu_index = period_ms, gpu_index
        # (t, sm_mhz, power_w, temp_c, reasons)
        self.samples: list[tuple[float, float, float, float, int]] = []
        self.error: str | None = None
        self._proc = self._thread = None

    def __enter__(self) -> Sampler:
        cmd = os.environ.get("MOEBENCH_SMI", "nvidia-smi")
        exe = shutil.which(cmd)
        if exe is None:
            self.error = f"{cmd} not found: no clock/power samples"
            return self
        self._proc = subprocess.Popen(
            [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={self.period_ms}",
             f"--id={self.gpu_index}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                sm, pw, temp = float(parts[0]), float(parts[1]), float(parts[2])
                reasons = int(parts[3], 16)
            except (ValueError, IndexError):  # "[N/A]", a header, a short line: not a sample
                continue
            self.samples.append((time.monotonic(), sm, pw, temp, reasons))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._thread.join(timeout=5)
            if not self.samples and self.error is None:
                self.error = "nvidia-smi gave no samples"

    def summary(self, windows: list[tuple[float, float]]) -> dict | None:
        """Summary of the samples that arrived inside any (t0, t1) window; None when there are none."""
        return summarise([s for s in list(self.samples) if any(t0 <= s[0] <= t1 for t0, t1 in windows)])


def summarise(samples) -> dict | None:
    if not samples:
        return None
    sm = [s[1] for s in samples]
    pw = [s[2] for s in samples]
    return {"n": len(samples), "sm_mhz_mean": sum(sm) / len(sm), "sm_mhz_min": min(sm),
            "power_w_mean": sum(pw) / len(pw), "power_w_max": max(pw),
            "temp_c_max": max(s[3] for s in samples),
            "power_cap_frac": sum(1 for s in samples if s[4] & SW_POWER_CAP) / len(samples),
            "thermal_frac": sum(1 for s in samples if s[4] & (HW_SLOWDOWN | SW_THERMAL)) / len(samples)}
