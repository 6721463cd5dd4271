"""Parity: a backend's output and every gradient (x, w1, w2, p) against `naive` in higher precision (fp32 cases:
float64; bf16/fp16: float32), on the same weights, inputs AND routing decisions (routing is drawn once and handed
to both: re-routing in another precision flips top-k choices, which is not the kernel's error).

Legend: R ranks, r this rank, T tokens per rank, D model dim, F expert hidden, E experts, K top-k.

One function serves one process (R = 1) and every rank of an expert-parallel case: the reference runs on the
global batch of R*T tokens, the backend on this rank's rows r*T..(r+1)*T. y, dx and dp are compared on those rows;
a weight gradient is compared whole, against the reference restricted to this rank's expert shard (zero
elsewhere: an EP rank only computes its own experts' gradients; with R = 1 the shard is every expert).
A capacity backend (Backend.capacity) is compared on the slots it keeps: dropped slots weigh 0 in the reference.

gemm_dtype "fp8-rowwise" / "fp8-rowwise-fp8bwd" (one process): the reference is moebench/fp8ref.py in fp32 (the
same quantisation, then the MoE in fp32), fed the inputs rounded to the workload dtype first, so its quantiser sees
the values the backend's does.
Tolerance, per tensor k, from the reference's own error: self_k = rel err of the reference when it rounds what a
bf16-carrying backend holds in bf16 (GEMM outputs, activation) against itself unrounded: the scatter a correct fp8
backend shows (a value near an e4m3 rounding boundary rounds the other way once it is bf16). tol_k = max(the
workload dtype's plain tolerance, FP8_MARGIN * self_k); the margin covers what self_k does not model (accumulation
order and Hopper's fast fp8 accumulation), the floor the bf16 backward GEMMs. The record keeps self_k, the tolerances,
fp8_cost (the reference vs the unquantised naive MoE: what fp8 costs in accuracy), vs_naive (the backend vs the
unquantised naive MoE, end to end) and detects_unquantised (tol_y < fp8_cost_y: a backend that silently skipped
the quantisation would fail this gate at this shape).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from moebench import fp8ref, metrics
from moebench.core.steps import DTYPES
from moebench.model import in_layout
from moebench.registry import get
from moebench.routing import capacity_keep, fixed_idx
from moebench.spec import Case

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
FP8_MARGIN = 2.0  # fp8 tolerance = max(TOLERANCE[dtype], FP8_MARGIN * the reference's own error): module docstring


def routing_for(case: Case, T: int, gen: torch.Generator, layer: int = 0) -> torch.Tensor:
    """idx_TK for parity: the workload's synthetic table, or top-k of random router scores for `learned`."""
    spec, w = case.model, case.workload
    if w.routing != "learned":
        return fixed_idx(w.routing, T, spec.n_experts, spec.top_k, seed=w.seed * 1000 + layer, layer=layer)
    return torch.randn(T, spec.n_experts, generator=gen).topk(spec.top_k, dim=-1).indices


def mismatch_reason(par: dict) -> str:
    tols = par.get("tols") or {k: par["tol"] for k in par["errors"]}
    def over(k):  # how far over its tolerance (a NaN error is the worst)
        e = par["errors"][k]
        return math.inf if e is None or math.isnan(e) else e / tols[k]
    if par.get("detects_unquantised") is False:
        return (f"the fp8 gate cannot decide at this shape: its y tolerance {par['tols']['y']:.2g} is not below what "
                f"skipping the quantisation costs ({par['fp8_cost']['y']:.2g}), so an unquantised backend would pass")
    worst = max(par["errors"], key=over)
    if "tols" in par:
        return f"{worst} rel err {par['errors'][worst]:.3g} > tol {tols[worst]:.2g} vs the fp8 reference"
    return f"{worst} rel err {par['errors'][worst]:.3g} > tol {par['tol']:.0e} vs naive"


def parity(case: Case, *, ranks: int = 1, rank: int = 0) -> dict:
    backend, naive = get(case.backend), get("naive")
    spec, w = case.model, case.workload
    if not backend.dropless and backend.capacity is None:  # registry.register refuses these; never time one
        raise ValueError(f"{backend.name} drops tokens but gives no capacity(): no reference to check it against")
    dev, dt = torch.device(case.device), DTYPES[w.dtype]
    if dev.type == "cuda" and dev.index is None:  # this rank's GPU, for the generator as for the tensors
        dev = torch.device("cuda", torch.cuda.current_device())
    ref_dt = torch.float64 if dt == torch.float32 else torch.float32
    R, T, D, Fh, E = ranks, w.tokens, spec.d_model, spec.d_expert, spec.n_experts
    n_fold = spec.n_shared_experts if backend.folds_shared else 0  # checked as timed: E + n_s experts, K + n_s
    E += n_fold
    g = torch.Generator().manual_seed(w.seed + 12345)
    gd = torch.Generator(device=dev).manual_seed(w.seed + 12345)  # big tensors are drawn on the device: fast
    base = {
        "x_TD": torch.randn(R * T, D, generator=gd, device=dev),
        "w1_EDF2": torch.randn(E, D, 2 * Fh, generator=gd, device=dev) / math.sqrt(D),
        "w2_EFD": torch.randn(E, Fh, D, generator=gd, device=dev) / math.sqrt(Fh),
        "p_TK": torch.rand(R * T, spec.top_k + n_fold, generator=gd, device=dev) + 0.05,
    }
    idx_TK = routing_for(case, R * T, g).to(dev)
    if n_fold:  # every token also goes to the always-on experts E-n_fold .. E-1
        idx_TK = torch.cat([idx_TK, torch.arange(E - n_fold, E, device=dev).expand(R * T, n_fold)], dim=1)
    dy_TD = torch.randn(R * T, D, generator=gd, device=dev)
    fp8 = w.gemm_dtype != "default"
    if fp8:
        if R > 1:
            raise ValueError(f"gemm_dtype '{w.gemm_dtype}': parity runs on one process, not {R} ranks")
        base = {k: v.to(dt).to(ref_dt) for k, v in base.items()}  # the values the backend's quantiser sees
    opts = backend.call_options(case.backend_options, w.gemm_dtype)
    keep_TK, extra = None, {}
    if w.exec != "eager":  # what this gate runs: the backend's forward and backward, never the compiled/graphed step
        extra["checked"] = f"the backend's eager forward and backward (the timed step runs under {w.exec})"
    if backend.capacity is not None:
        C = backend.capacity(T, spec.top_k, E, **opts)
        keep_TK = capacity_keep(idx_TK, E, C)
        extra |= {"capacity": C, "dropped_frac": 1.0 - keep_TK.float().mean().item()}
    mine = slice(r0 := rank * T, r0 + T)

    def run(fn, dtype, rows, keep=None, layout="canonical", **opts):
        leaves = {k: (v[rows] if k in ("x_TD", "p_TK") else v).to(dtype, copy=True) for k, v in base.items()}
        leaves["w1_EDF2"], leaves["w2_EFD"] = in_layout(leaves["w1_EDF2"], leaves["w2_EFD"], layout)
        leaves = {k: v.requires_grad_() for k, v in leaves.items()}
        p_TK = leaves["p_TK"] if keep is None else leaves["p_TK"] * keep  # dropped slots weigh 0
        y = fn(leaves["x_TD"], idx_TK[rows], p_TK, leaves["w1_EDF2"], leaves["w2_EFD"], **opts)
        y.backward(dy_TD[rows].to(dtype))
        return {"y": y.detach()} | {f"d{k.split('_')[0]}": v.grad for k, v in leaves.items()}

    ref = run(naive.forward, ref_dt, slice(None), keep=keep_TK)
    got = run(backend.forward, dt, mine, layout=backend.weight_layout, **opts)  # weights stored as when timed
    El = E // R

    def compare(got: dict, ref: dict) -> dict:
        errors = {}
        for k in ref:
            want = ref[k][mine] if k in ("y", "dx", "dp") else torch.zeros_like(ref[k])
            if k in ("dw1", "dw2"):
                want[rank * El:(rank + 1) * El] = ref[k][rank * El:(rank + 1) * El]
            errors[k] = metrics.rel_err(got[k] if got[k] is not None else torch.zeros_like(want), want)
        return errors

    if fp8:
        quantised = partial(fp8ref.forward, gemm_dtype=w.gemm_dtype)
        return _fp8_gate(case, compare, got, ref, run(quantised, ref_dt, slice(None), keep=keep_TK),
                         run(partial(quantised, round_to=dt), ref_dt, slice(None), keep=keep_TK)) | extra
    errors = compare(got, ref)
    tol = TOLERANCE[w.dtype]
    where = f" on the unsharded layer, global batch {R} x {T} tokens" if R > 1 else ""
    out = {"ok": all(e <= tol for e in errors.values()), "errors": errors, "tol": tol,
           "reference": f"naive in {str(ref_dt).replace('torch.', '')}{where}"
                        + (" on the kept slots" if keep_TK is not None else ""), "T": T, "ranks": R} | extra
    return out


def _fp8_gate(case: Case, compare, got: dict, unquantised: dict, ref: dict, ref_rounded: dict) -> dict:
    """The fp8 parity verdict (module docstring): got vs the fp8 reference, tolerances from its own error."""
    w = case.workload
    errors, own = compare(got, ref), compare(ref_rounded, ref)
    tols = {k: max(TOLERANCE[w.dtype], FP8_MARGIN * own[k]) for k in errors}
    cost = compare(ref, unquantised)
    detects = bool(tols["y"] < cost["y"])  # else an unquantised backend would pass too: the gate decides nothing
    return {"ok": detects and all(e <= tols[k] for k, e in errors.items()), "errors": errors, "tol": tols["y"],
            "tols": tols,
            "reference": f"{w.gemm_dtype} reference (moebench/fp8ref.py) in float32 on {w.dtype}-rounded inputs",
            "tolerance_rule": f"max({TOLERANCE[w.dtype]:g}, {FP8_MARGIN:g} x the reference's own error at {w.dtype})",
            "reference_self_error": own, "fp8_cost": cost, "vs_naive": compare(got, unquantised),
            "detects_unquantised": detects, "gemm_dtype": w.gemm_dtype, "T": w.tokens, "ranks": 1}
