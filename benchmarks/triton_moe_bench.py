"""Standalone GPU benchmark of the expert block: `triton` (both recompute settings) vs `grouped_mm`.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
For each shape: uniform routing (K distinct random experts per token), bf16 inputs; parity of `triton`
against `naive` in fp32 on the same bf16-rounded inputs and routing (y and every gradient, <= 2e-2);
then forward (no grad) and forward+backward timed with CUDA events (warm-up first, L2 flushed between
repeats, median of --reps) and peak memory of one training step. TFLOP/s counts 6*T*K*D*F forward and 3x
that for forward+backward (nominal: recompute=0 does 4*T*K*D*F more). Writes JSON to $OUT (or --out).
Imports only moebench.registry and implementations.* (no pydantic on the device).

  python benchmarks/triton_moe_bench.py [--shapes olmoe,mixtral] [--reps 10] [--backends triton,grouped_mm]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from implementations.naive import forward as naive
from moebench.registry import get

SHAPES = {  # name: (T, D, F, E, K)
    "f256-e128": (24576, 1536, 256, 128, 8),
    "f512-e64": (24576, 1536, 512, 64, 4),
    "f1024-e32": (24576, 1536, 1024, 32, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "mixtral": (16384, 4096, 14336, 8, 2),
    "deepseek-fine": (16384, 2048, 1408, 64, 6),
    "moeforge-small": (16384, 512, 1365, 4, 2),
}


def make_inputs(T, D, F, E, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    idx_TK = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
    p_TK = torch.softmax(torch.randn(T, K, device="cuda", generator=g), dim=1).to(torch.bfloat16)
    x_TD = torch.randn(T, D, generator=g, **bf)
    w1_EDF2 = (torch.randn(E, D, 2 * F, generator=g, **bf) / D**0.5).to(torch.bfloat16)
    w2_EFD = (torch.randn(E, F, D, generator=g, **bf) / F**0.5).to(torch.bfloat16)
    dy_TD = torch.randn(T, D, generator=g, **bf)
    return x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD


def fwd_bwd(fn, x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD, dtype, **opts):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]
    y = fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts)
    y.backward(dy_TD.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def parity(fn, inputs, ref, **opts):
    got = fwd_bwd(fn, *inputs, torch.bfloat16, **opts)
    return {n: rel(g, r) for n, g, r in zip(("y", "dx", "dp", "dw1", "dw2"), got, ref)}


_FLUSH = None


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    _FLUSH.zero_()


def time_it(step, reps, warmup=3):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        flush_l2()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        ms.append(s.elapsed_time(e))
    return ms


def bench_backend(fn, inputs, reps, **opts):
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]

    def fwd():
        with torch.no_grad():
            fn(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, **opts)

    def train():
        for t in leaves:
            t.grad = None
        fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts).backward(dy_TD)

    fwd_ms = time_it(fwd, reps)
    fb_ms = time_it(train, reps)
    host_ms = []  # host time to enqueue one training step (the GPU may still be busy): launch-bound if ~ fb_ms
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train()
        host_ms.append((time.perf_counter() - t0) * 1e3)
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in leaves:  # the step's own footprint: inputs + weights + grads + everything transient
        t.grad = None
    return {"fwd_ms": fwd_ms, "fb_ms": fb_ms, "host_fb_ms": statistics.median(host_ms), "peak_gib": peak / 2**30, "peak_over_inputs_gib": (peak - base) / 2**30}


def kernel_profile(fn, inputs, top=9, **opts):
    """One training step under torch.profiler: device ms per kernel name, largest first."""
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]
    fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts).backward(dy_TD)
    for t in leaves:  # (results/triton_dev v2-v5 profiles were taken without this: they include one
        t.grad = None  # gradient accumulation, the 'vectorized_elementwise' entry)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts).backward(dy_TD)
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.key[:60]] = t / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])


PROBE_CFGS = [(128, 128, 32, 8, 4, 5), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
              (128, 256, 32, 8, 8, 5)]


def probe_wgrad(names):
    """dW kernels alone, per config: the operand that runs over the reduced rows stored as given (MN-major:
    rows x M) or transposed (K-major: M x rows, as a producer could write it). Prints TFLOP/s."""
    os.environ["MOEBENCH_TRITON_TUNE"] = "0"
    out = {}
    for name in names:
        out.update(_probe_shape(name))
    del os.environ["MOEBENCH_TRITON_TUNE"]
    return out


def _probe_shape(name):
    from implementations.triton import moe, tuning
    T, D, F, E, K = SHAPES[name]
    x_TD, idx_TK, _, w1_EDF2, w2_EFD, dy_TD = make_inputs(T, D, F, E, K)
    R = moe.Routing(idx_TK, E, moe.kernels(False))
    L = moe.Launcher(x_TD, w1_EDF2, R)
    ap_SF = torch.randn(R.S, F, device="cuda", dtype=torch.bfloat16)
    dh_SF2 = torch.randn(R.S, 2 * F, device="cuda", dtype=torch.bfloat16)
    apT, dhT = ap_SF.t().contiguous(), dh_SF2.t().contiguous()
    dw2, dw1 = torch.empty_like(w2_EFD), torch.empty_like(w1_EDF2)
    fl2, fl1 = 2 * R.S * F * D, 2 * R.S * D * 2 * F
    variants = {
        "dW2 A=ap(MN)": (fl2, lambda: L.wgrad(ap_SF, dy_TD, False, True, dw2)),
        "dW2 A=apT(K)": (fl2, lambda: L.wgrad(apT, dy_TD, False, True, dw2, a_t=True)),
        "dW1 A=x[tok](MN)": (fl1, lambda: L.wgrad(x_TD, dh_SF2, True, False, dw1)),
        "dW1^T A=dhT(K)": (fl1, lambda: L.wgrad(dhT, x_TD, False, True, dw1, a_t=True, out_t=True)),
    }
    out = {}
    for vname, (fl, fn) in variants.items():
        row = {}
        for cfg in PROBE_CFGS:
            tuning.CONFIGS["wgrad"] = [tuning.Cfg(*cfg)]
            try:
                row[str(cfg)] = fl / statistics.median(time_it(fn, 5, warmup=1)) / 1e9
            except Exception as exc:  # noqa: BLE001
                row[str(cfg)] = f"{type(exc).__name__}"
        out[f"{name} {vname}"] = row
        print(f"{name:8s} {vname:18s} " + " ".join(f"{v:6.0f}" if isinstance(v, float) else v
                                                  for v in row.values()), flush=True)
    L.wgrad(ap_SF, dy_TD, False, True, dw2)
    a = dw2.clone()
    L.wgrad(apT, dy_TD, False, True, dw2, a_t=True)
    L.wgrad(x_TD, dh_SF2, True, False, dw1)
    b = dw1.clone()
    L.wgrad(dhT, x_TD, False, True, dw1, a_t=True, out_t=True)
    print(f"{name} layouts agree: dW2 {rel(dw2, a):.1e} dW1 {rel(dw1, b):.1e}", flush=True)
    return out


def no_sync_check(fn, inputs, **opts):
    """One training step with CUDA's sync debug mode on: any host sync raises."""
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts).backward(dy_TD)
        return "ok"
    except RuntimeError as exc:
        return f"sync: {exc}"[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def ceiling_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_it(lambda: a @ b, 10)
    return 2 * 8192**3 / statistics.median(ms) / 1e9


def small_fp32_check():
    """Odd small shapes in fp32 (ieee dots) against float64 naive, on the GPU."""
    out = {}
    for (T, D, F, E, K) in [(37, 200, 136, 5, 2), (300, 256, 128, 7, 7), (1, 64, 96, 3, 1)]:
        inputs = make_inputs(T, D, F, E, K, seed=T)
        inputs = [t.float() if t.is_floating_point() else t for t in inputs]
        ref = fwd_bwd(naive, *inputs, torch.float64)
        got = fwd_bwd(get("triton").forward, *inputs, torch.float32)
        out[f"{T},{D},{F},{E},{K}"] = max(rel(g, r) for g, r in zip(got, ref))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default="triton:100,triton:0,grouped_mm")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also a per-kernel device-time breakdown")
    ap.add_argument("--probe-wgrad", default="", help="shapes for the dW kernel probe (then exit)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    from implementations.triton import tuning

    if args.probe_wgrad:
        print("configs:", PROBE_CFGS)
        res = probe_wgrad(args.probe_wgrad.split(","))
        (Path(args.out) / "wgrad_probe.json").write_text(json.dumps(res, indent=1))
        return
    out_path = Path(args.out) / "triton_bench.json"
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
           "cases": []}
    res["env"]["ceiling_tflops"] = ceiling_tflops()
    t0 = time.time()
    try:
        res["fp32_small_max_rel_err"] = small_fp32_check()
    except Exception as exc:  # noqa: BLE001
        res["fp32_small_max_rel_err"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    print("fp32 small checks", res["fp32_small_max_rel_err"], f"{time.time() - t0:.0f}s", flush=True)
    rows = []
    for name in args.shapes.split(","):
        T, D, F, E, K = SHAPES[name]
        inputs = make_inputs(T, D, F, E, K)
        flops = 6 * T * K * D * F
        gmm_fb = gmm_fwd = ref = None
        for spec in args.backends.split(","):
            bname, _, rc = spec.partition(":")
            opts = {"recompute": int(rc)} if rc else {}
            fn = get(bname).forward
            case = {"shape": name, "T": T, "D": D, "F": F, "E": E, "K": K, "backend": bname, "options": opts}
            t1 = time.time()
            try:
                if bname == "triton":
                    if not args.no_parity:
                        ref = ref or fwd_bwd(naive, *inputs, torch.float32)
                        case["parity"] = parity(fn, inputs, ref, **opts)
                        case["parity_ok"] = max(case["parity"].values()) <= 2e-2
                    m = bench_backend(fn, inputs, args.reps, **opts)
                    case["no_sync"] = no_sync_check(fn, inputs, **opts)
                else:
                    m = bench_backend(fn, inputs, args.reps, **opts)
                if args.profile:
                    case["kernels_ms"] = kernel_profile(fn, inputs, **opts)
                    print("   ", "  ".join(f"{k[:28]} {v:.2f}" for k, v in case["kernels_ms"].items()), flush=True)
            except Exception as exc:  # noqa: BLE001 - record and go on to the next case
                case["status"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(name, spec, case["status"], flush=True)
                res["cases"].append(case)
                torch.cuda.empty_cache()
                continue
            case.update(m)
            fwd, fb = statistics.median(m["fwd_ms"]), statistics.median(m["fb_ms"])
            case.update(fwd_tflops=flops / fwd / 1e9, fb_tflops=3 * flops / fb / 1e9, wall_s=time.time() - t1)
            if bname == "grouped_mm":
                gmm_fwd, gmm_fb = fwd, fb
            res["cases"].append(case)
            rows.append(case)
            print(f"{name:15s} {spec:12s} fwd {fwd:8.3f} ms {case['fwd_tflops']:6.1f} TF | f+b {fb:8.3f} ms "
                  f"{case['fb_tflops']:6.1f} TF | host {m['host_fb_ms']:6.2f} ms | peak {m['peak_gib']:6.2f} GiB | parity "
                  f"{max(case.get('parity', {'-': 0}).values()):.1e} | {case.get('no_sync', '')} | "
                  f"{case['wall_s']:.0f}s", flush=True)
        for c in res["cases"]:
            if c["shape"] == name and gmm_fb and "fb_ms" in c:
                c["fb_speedup_vs_grouped_mm"] = gmm_fb / statistics.median(c["fb_ms"])
                c["fwd_speedup_vs_grouped_mm"] = gmm_fwd / statistics.median(c["fwd_ms"])
        res["tuned"] = {k: list(v) for k, v in tuning.tuned().items()}
        out_path.write_text(json.dumps(res, indent=1))
        del inputs, ref
        torch.cuda.empty_cache()
    ceil = res["env"]["ceiling_tflops"]
    print(f"\n{res['env']['gpu']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dense bf16 ceiling {ceil:.0f} TFLOP/s  total {time.time() - t0:.0f}s")
    print(f"{'shape':15s} {'backend':16s} {'fwd TF':>7s} {'f+b TF':>7s} {'%ceil':>6s} {'fwd x':>6s} {'f+b x':>6s} "
          f"{'peak GiB':>8s} {'parity':>8s}")
    for c in rows:
        b = c["backend"] + (f":{c['options']['recompute']}" if c["options"] else "")
        print(f"{c['shape']:15s} {b:16s} {c['fwd_tflops']:7.1f} {c['fb_tflops']:7.1f} {100 * c['fb_tflops'] / ceil:6.1f} "
              f"{c.get('fwd_speedup_vs_grouped_mm', 0):6.2f} {c.get('fb_speedup_vs_grouped_mm', 0):6.2f} "
              f"{c['peak_gib']:8.2f} {max(c.get('parity', {'-': 0}).values()):8.1e}")


if __name__ == "__main__":
    main()
