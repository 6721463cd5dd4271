"""Where a layer-level training step spends its GPU time: the harness's own step (router, top-k, backend,
combine; as the suites time it), event-timed, then under torch.profiler.

For each (preset, backend) it prints and writes to $OUT/profile_layer.json:
  step_ms   median of --reps event-timed steps (L2 flushed before each, as the harness does)
  busy_ms   sum of kernel time per step from the profiler (3 steps averaged)
  idle_ms   step_ms - busy_ms: the GPU waiting on the host (launch gaps, syncs)
  kernels   per kernel name: ms per step, calls per step, share of the step
  sync      whether a step syncs with the host (torch.cuda.set_sync_debug_mode("error"))

  python benchmarks/profile_layer.py [--presets mixtral-layer,coarse-32x2-layer] [--backends grouped_mm,triton:100]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moebench import core, envinfo
from moebench.spec import Case, Workload, preset

SEQ = {"fine-128x8-layer": 24576, "mid-64x4-layer": 24576, "coarse-32x2-layer": 24576}


def parse_backend(s: str):
    name, _, rc = s.partition(":")
    return name, ({"recompute": int(rc)} if rc else {})


def profile_one(name: str, backend: str, opts: dict, reps: int, routing: str) -> dict:
    dev = torch.device("cuda")
    case = Case(model=preset(name), backend=backend, backend_options=opts, device="cuda",
                workload=Workload(level="layer", mode="train", batch=1, seq=SEQ.get(name, 16384),
                                  dtype="bfloat16", routing=routing))
    st = core.build_step(case, dev)
    n = core.warm_up(st, 3, dev)[0]
    flush = core.l2_flush(case, dev)
    step_ms, _ = core.timed_block(st, n, reps, dev, flush)
    step = st.run
    torch.cuda.synchronize()
    sync = "ok"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(n + reps)
    except RuntimeError as e:
        sync = f"syncs: {str(e).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(n + reps + 1 + i)
        torch.cuda.synchronize()
    # the kernel timeline: gaps between consecutive kernels (GPU idle inside and between the profiled steps)
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    gaps = []
    for prev, nxt in zip(evs, evs[1:]):
        g = (nxt.time_range.start - prev.time_range.end) / 1e3
        if g > 0.005:
            gaps.append({"ms": g, "after": prev.name[:80], "before": nxt.name[:80]})
    span = (evs[-1].time_range.end - evs[0].time_range.start) / 1e3 / steps if evs else 0.0
    kern: dict[str, list] = {}
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0:
            kern[ev.key] = [ev.self_device_time_total / 1e3 / steps, ev.count / steps]
    busy = sum(v[0] for v in kern.values())
    med = statistics.median(step_ms)
    top = sorted(kern.items(), key=lambda kv: -kv[1][0])
    return {"preset": name, "backend": backend, "options": opts, "routing": routing, "T": case.workload.tokens,
            "step_ms": med, "step_ms_all": step_ms, "busy_ms": busy, "idle_ms": med - busy, "sync": sync,
            "profiled_span_ms": span, "gap_ms_per_step": sum(g["ms"] for g in gaps) / steps,
            "top_gaps": sorted(gaps, key=lambda g: -g["ms"])[:8],
            "kernels": [{"name": k[:140], "ms": v[0], "calls": v[1], "share": v[0] / med} for k, v in top]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="mixtral-layer,coarse-32x2-layer,olmoe-layer")
    ap.add_argument("--backends", default="grouped_mm,triton:100")
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--tag", default="", help="suffix of the output file: profile_layer<tag>.json")
    args = ap.parse_args()
    env = envinfo.collect("cuda")
    out = []
    for name in args.presets.split(","):
        for b in args.backends.split(","):
            backend, opts = parse_backend(b)
            try:
                r = profile_one(name, backend, opts, args.reps, args.routing)
            except Exception as e:  # keep the other cases
                r = {"preset": name, "backend": backend, "options": opts, "error": f"{type(e).__name__}: {e}"}
                print(f"== {name} {b}: FAILED {r['error'][:300]}", flush=True)
                out.append(r)
                continue
            out.append(r)
            print(f"== {name} {b} ({r['routing']}, T={r['T']}): step {r['step_ms']:.2f} ms, kernels {r['busy_ms']:.2f} ms,"
                  f" idle {r['idle_ms']:.2f} ms, host sync: {r['sync']}", flush=True)
            print(f"   profiled: {r['profiled_span_ms']:.2f} ms/step span, gaps {r['gap_ms_per_step']:.2f} ms/step; largest:")
            for g in r["top_gaps"][:4]:
                print(f"     {g['ms']:.3f} ms after {g['after'][:50]} before {g['before'][:50]}")
            for k in r["kernels"][:args.top]:
                print(f"   {k['ms']:8.3f} ms {k['calls']:5.1f}x {100 * k['share']:5.1f}%  {k['name'][:100]}")
            torch.cuda.empty_cache()
    dest = Path(os.environ.get("OUT", ".")) / f"profile_layer{args.tag}.json"
    switches = {k: v for k, v in os.environ.items() if k.startswith("MOEBENCH_")}
    dest.write_text(json.dumps({"env": env, "switches": switches, "cases": out}, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
