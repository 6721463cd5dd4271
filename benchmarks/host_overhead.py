"""Host (CPU) time of a layer-level training step, against its GPU time: is the step launch-bound?

For each (preset, backend): host_ms = wall time of the step() call itself, started with the GPU idle (the GPU
runs the kernels while the host is still enqueueing); gpu_ms = CUDA-event time of the same step. When host_ms
is near gpu_ms the GPU waits on launches. Then cProfile over --steps steps: the top Python functions by own time.

  python benchmarks/host_overhead.py [--presets coarse-32x2-layer] [--backends triton:100,grouped_mm]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.profile_layer import SEQ, parse_backend
from moebench import core
from moebench.spec import Case, Workload, preset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="coarse-32x2-layer")
    ap.add_argument("--backends", default="triton:100,grouped_mm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    dev = torch.device("cuda")
    for name in args.presets.split(","):
        for b in args.backends.split(","):
            backend, opts = parse_backend(b)
            case = Case(model=preset(name), backend=backend, backend_options=opts, device="cuda",
                        workload=Workload(level="layer", mode="train", batch=1, seq=SEQ.get(name, 16384),
                                          dtype="bfloat16", routing="uniform"))
            st = core.build_step(case, dev)
            n = core.warm_up(st, 3, dev)[0]
            step = st.run
            host, gpu = [], []
            for i in range(args.steps):
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                s.record()
                step(n + i)
                e.record()
                host.append((time.perf_counter() - t0) * 1e3)
                e.synchronize()
                gpu.append(s.elapsed_time(e))
            print(f"== {name} {b}: host {statistics.median(host):.2f} ms/step, gpu(event) {statistics.median(gpu):.2f}"
                  f" ms/step (medians of {args.steps})", flush=True)
            pr = cProfile.Profile()
            torch.cuda.synchronize()
            pr.enable()
            for i in range(args.steps):
                step(n + args.steps + i)
            pr.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(args.top)
            lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
            print("\n".join(lines[:args.top + 8]))
            del step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
