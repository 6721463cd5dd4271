"""Diagnose step-time noise on a GPU: host enqueue time vs GPU event time per step, drift over steps,
with and without CPU pinning. Usage: python3 scripts/diag_step.py [preset] [backend] [steps]"""
import os
import sys
import time

import torch

from moebench import core
from moebench.spec import Case, Workload, preset

name, be, n = (sys.argv[1:] + ["moeforge-medium", "grouped_mm", "60"])[:3]
n = int(n)
dev = torch.device("cuda")
for pin in (False, True):
    if pin:
        os.sched_setaffinity(0, {3})
    for lr0 in (False,):
        case = Case(model=preset(name), backend=be, device="cuda",
                    workload=Workload(level="model", mode="train", batch=8, seq=512, dtype="bfloat16"))
        step = core.build_step(case, dev).run
        host, gpu = [], []
        for i in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            s.record()
            step(i)
            e.record()
            host.append((time.perf_counter() - t) * 1e3)
            e.synchronize()
            gpu.append(s.elapsed_time(e))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(n)
            torch.cuda.synchronize()
        busy = sum(ev.self_device_time_total for ev in prof.key_averages()) / 1e3
        print(f"{name} {be} pin={pin}: gpu-busy/step {busy:.1f} ms | first10 ev {[round(x) for x in gpu[:10]]}")
        print(f"   last20 ev {[round(x) for x in gpu[-20:]]}")
        print(f"   last20 host {[round(x) for x in host[-20:]]}")
        del step
        torch.cuda.empty_cache()
