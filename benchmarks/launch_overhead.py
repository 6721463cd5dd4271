"""Host time of one Triton kernel launch in the expert block (no GPU timing): is the step launch-bound?

Times N back-to-back launches (host only, GPU work tiny: T=256) of
  jit      kernel[grid](...) with descriptors built once (triton's JITFunction.run)
  jit+desc the same with the two TensorDescriptors built per launch (what moe.py does)
  launcher Launcher.gate_up_sorted (tuning lookup, buffers, descriptors, launch)
  torch    a torch op of the same flavour (x.index_select) for scale
then cProfile of the `jit+desc` loop.
  python benchmarks/launch_overhead.py [--n 500]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MOEBENCH_TRITON_TUNE", "0")
from implementations.triton import moe


def host_us(fn, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    T, D, F, E, K = 256, 2048, 1024, 64, 8
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(T, D, **bf)
    w1 = torch.randn(E, D, 2 * F, **bf) / D**0.5
    idx = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    kn = moe.kernels(False)
    R = moe.Routing(idx, E, kn)
    L = moe.Launcher(x, w1, R)
    xs = x.index_select(0, R.tok_S)
    L.gate_up_sorted(xs, w1, True)  # compile
    cfg = moe.tuning.CONFIGS["gate_up_tma"][0]
    tile_e, tile_r0, n = R.schedule(cfg.BM)
    a = torch.empty(R.S, F, **bf)
    h = torch.empty(R.S, 2 * F, **bf)
    grid = (n * (F // cfg.BN),)
    d1 = moe._desc(xs, [cfg.BM, cfg.BK])
    d2 = moe._desc(w1.view(E * D, 2 * F), [cfg.BK, cfg.BN])
    opts = moe._opts(cfg)

    def jit():
        kn.gate_up_tma_kernel[grid](d1, d2, tile_e, tile_r0, R.ends_E, a, h, D, F, n, a.stride(0), h.stride(0),
                                    SAVE_H=True, PREC="tf32", UPCAST=False, **opts)

    def jit_desc():
        kn.gate_up_tma_kernel[grid](moe._desc(xs, [cfg.BM, cfg.BK]), moe._desc(w1.view(E * D, 2 * F), [cfg.BK, cfg.BN]),
                                    tile_e, tile_r0, R.ends_E, a, h, D, F, n, a.stride(0), h.stride(0),
                                    SAVE_H=True, PREC="tf32", UPCAST=False, **opts)

    def launcher():
        L.gate_up_sorted(xs, w1, True)

    def torch_op():
        x.index_select(0, R.tok_S)

    for name, fn in [("jit", jit), ("jit+desc", jit_desc), ("launcher", launcher), ("torch", torch_op)]:
        host_us(fn, 20)
        print(f"{name:10s} {host_us(fn, args.n):7.1f} us/launch (host)", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.n):
        jit_desc()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))


if __name__ == "__main__":
    main()
