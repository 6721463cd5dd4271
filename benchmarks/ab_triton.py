"""A/B of one Triton switch on the same machine and inputs (issue 8 dev): `triton` recompute=100 f+b and fwd,
with an environment variable set to A then B, alternated `--rounds` times (ABAB...), medians of --reps each.
  python benchmarks/ab_triton.py --var MOEBENCH_TRITON_WDESC --a 0 --b 1 [--shapes olmoe,mixtral]
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
from benchmarks.triton_moe_bench import SHAPES, bench_backend, make_inputs  # noqa: E402
from moebench.registry import get  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--var", required=True)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--shapes", default="f1024-e32,olmoe,mixtral,deepseek-fine")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    fn = get("triton").forward
    res = {"var": args.var, "gpu": torch.cuda.get_device_name(), "cases": []}
    for name in args.shapes.split(","):
        T, D, F, E, K = SHAPES[name]
        inputs = make_inputs(T, D, F, E, K)
        flops = 6 * T * K * D * F
        for rnd in range(args.rounds):
            for val in (args.a, args.b):
                os.environ[args.var] = val
                m = bench_backend(fn, inputs, args.reps, recompute=100)
                fwd, fb = statistics.median(m["fwd_ms"]), statistics.median(m["fb_ms"])
                res["cases"].append({"shape": name, "round": rnd, args.var: val, "fwd_ms": fwd, "fb_ms": fb,
                                     "fwd_tflops": flops / fwd / 1e9, "fb_tflops": 3 * flops / fb / 1e9,
                                     "host_fb_ms": m["host_fb_ms"]})
                print(f"{name:14s} round {rnd} {args.var}={val}: fwd {fwd:7.3f} ms ({flops / fwd / 1e9:5.0f} TF) "
                      f"f+b {fb:7.3f} ms ({3 * flops / fb / 1e9:5.0f} TF) host {m['host_fb_ms']:.2f} ms", flush=True)
        (Path(args.out) / "ab.json").write_text(json.dumps(res, indent=1))
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
