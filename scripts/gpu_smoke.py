"""A quick check of the execution modes on a GPU, in one process (no workers): each case through
moebench.harness.run_case with a short time budget; prints one line per case and writes the records to
$OUT/smoke.jsonl.   usage: python3 scripts/gpu_smoke.py [max_time_s]"""
import json
import os
import sys
import time

from moebench import envinfo, harness
from moebench.spec import Case, Workload, preset

max_time = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
out = open(os.path.join(os.environ.get("OUT", "."), "smoke.jsonl"), "a")
env = envinfo.collect("cuda")
layer = dict(level="layer", mode="train", batch=1, seq=4096, dtype="bfloat16", routing="uniform")
model = dict(level="model", mode="train", batch=8, seq=512, dtype="bfloat16", routing="learned", warmup=5)
BACKENDS = ("grouped_mm", "triton")
CASES = [(n, b, wl, e) for e in ("eager", "graphs") for n, wl in (("olmoe-layer", layer), ("moeforge-small", model))
         for b in BACKENDS]
CASES += [("moeforge-small", "naive", model, "graphs"), ("moeforge-medium", "triton", model, "graphs")]
CASES += [(n, b, wl, "compile") for n, wl in (("olmoe-layer", layer), ("moeforge-small", model)) for b in BACKENDS]
for name, backend, wl, ex in CASES:
    c = Case(model=preset(name), backend=backend, device="cuda", workload=Workload(**wl, exec=ex),
             max_time_s=max_time)
    t0 = time.time()
    rec = harness.run_case(c, "smoke", env)
    m = rec["metrics"]
    line = f"{rec['status']:8s} {c.label}  {time.time() - t0:5.1f}s"
    if rec["status"] == "ok":
        p, x = m["precision"], m["exec"]
        line += (f"  {m['tokens_per_s']['p50']:,.0f} tok/s  spread {m['spread']:.1%}  ci ±{p['halfwidth']:.2%}"
                 f"  n={p['n_steps']}  peak {m['memory']['peak_allocated_gib']:.2f}  exec {json.dumps(x)[:160]}"
                 f"  noisy={m['noisy']}")
    else:
        line += f"  {rec['reason'][:300]}"
    print(line, flush=True)
    out.write(json.dumps(rec, default=str) + "\n")
