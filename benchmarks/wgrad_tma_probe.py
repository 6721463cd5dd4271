"""dW kernel probe (issue 8): pointer-load wgrad vs tensor-descriptor (TMA) wgrad vs cuBLAS, per config.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots (expert-sorted rows).
dW1 = x[tok]^T dH (x gathered, dH contiguous); dW2 = ap^T dy[tok] (ap contiguous, dy gathered).
Variants: `ptr` = wgrad_kernel (both operands by pointer loads), `tma` = wgrad_tma_kernel (the contiguous
operand by descriptor), `tma-sorted` = both by descriptor from a pre-gathered copy (the copy is timed apart as
`gather`), `cublas` = torch._grouped_mm with ragged K on the pre-gathered copy. Medians of 7 after warm-up,
L2 flushed; TFLOP/s = 2*S*M*N / time. Results agree with `ptr` (max rel printed).

  python benchmarks/wgrad_tma_probe.py [--shapes olmoe,mixtral] [--out DIR]
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
from benchmarks.triton_moe_bench import SHAPES, make_inputs, rel, time_it  # noqa: E402

CFGS = [(128, 128, 32, 8, 4, 5), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 3), (128, 256, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 256, 64, 8, 4, 4)]


def ms(fn):
    return statistics.median(time_it(fn, 7, warmup=2))


def probe(name):
    from implementations.triton import moe, tuning
    T, D, F, E, K = SHAPES[name]
    x_TD, idx_TK, _, w1_EDF2, w2_EFD, dy_TD = make_inputs(T, D, F, E, K)
    R = moe.Routing(idx_TK, E, moe.kernels(False))
    L = moe.Launcher(x_TD, w1_EDF2, R)
    S = R.S
    ap_SF = torch.randn(S, F, device="cuda", dtype=torch.bfloat16)
    dh_SF2 = torch.randn(S, 2 * F, device="cuda", dtype=torch.bfloat16)
    tok = R.tok_S.long()
    out = {"gather_ms": ms(lambda: x_TD.index_select(0, tok))}
    xs_SD, dys_SD = x_TD.index_select(0, tok), dy_TD.index_select(0, tok)
    offs = R.ends_E
    ops = {"dW1": (x_TD, dh_SF2, True, False, xs_SD, (E, D, 2 * F)),
           "dW2": (ap_SF, dy_TD, False, True, dys_SD, (E, F, D))}
    for op, (a, b, ga, gb, sorted_, shape) in ops.items():
        flops = 2 * S * shape[1] * shape[2]
        ref = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        tuning.CONFIGS["wgrad"] = [tuning.Cfg(*CFGS[0])]
        L.wgrad(a, b, ga, gb, ref)
        row = {}
        sa, sb = (sorted_, b) if ga else (a, sorted_)
        tries = [("ptr", CFGS[0], lambda o: L.wgrad(a, b, ga, gb, o))]
        tries += [("tma", c, lambda o: L.wgrad_tma(a, b, ga, gb, o)) for c in CFGS]
        tries += [("tma-sorted", c, lambda o: L.wgrad_tma(sa, sb, False, False, o)) for c in CFGS]
        for vname, cfg, fn in tries:
            tuning.CONFIGS["wgrad" if vname == "ptr" else "wgrad_tma"] = [tuning.Cfg(*cfg)]
            o = torch.empty_like(ref)
            try:
                t = ms(lambda: fn(o))  # noqa: B023
                row[f"{vname} {cfg}"] = {"tflops": flops / t / 1e9, "ms": t, "rel": rel(o, ref)}
            except Exception as exc:  # noqa: BLE001
                row[f"{vname} {cfg}"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        o = torch.empty_like(ref)
        try:
            t = ms(lambda: torch._grouped_mm(sa.t(), sb, offs=offs))
            o = torch._grouped_mm(sa.t(), sb, offs=offs)
            row["cublas"] = {"tflops": flops / t / 1e9, "ms": t, "rel": rel(o, ref)}
        except Exception as exc:  # noqa: BLE001
            row["cublas"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out[op] = row
        for k, v in row.items():
            print(f"{name:14s} {op} {k:36s} " + (f"{v['tflops']:6.0f} TF/s {v['ms']:7.3f} ms rel {v['rel']:.1e}"
                                                 if "tflops" in v else v["error"]), flush=True)
    print(f"{name:14s} gather x[tok] {out['gather_ms']:.3f} ms", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="olmoe,mixtral,f1024-e32,deepseek-fine")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.environ["MOEBENCH_TRITON_TUNE"] = "0"
    import triton
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__},
           "configs": "(BM, BN, BK, GROUP_M, num_warps, num_stages)"}
    for name in args.shapes.split(","):
        res[name] = probe(name)
        (Path(args.out) / "wgrad_tma_probe.json").write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
