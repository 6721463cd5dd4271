"""Report section for the expert-GEMM dtype axis (workload.gemm_dtype): what FP8 expert GEMMs buy in tokens/s against
bf16 grouped_mm on the same case and machine, what they cost in accuracy (each fp8 record's parity block: its error
against the fp8 reference and end to end against the unquantised naive MoE), and, for training runs, the loss gap
between bf16 and fp8 after the same steps (the curves themselves are in the training section, one line per backend
and gemm dtype).

Input: the report's frame (moebench.report.frame: one row per case as a reader sees it). Drawn only when a record has
a gemm dtype other than the default.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from moebench.reportparts import Section, Table, fmt

BASE = "grouped_mm"          # the bf16 baseline each fp8 case is compared with
MATCH = ["model", "workload_base", "exec", "gpu"]


def _err(par, key: str, part: str = "y") -> str:
    """par[key][part] as a percentage ("" where the record has none: a skipped case, an older record)."""
    v = (par.get(key) or {}).get(part) if isinstance(par, dict) else None
    return f"{v:.2%}" if isinstance(v, (int, float)) else ""


def _worst_grad(par, key: str) -> str:
    d = (par.get(key) or {}) if isinstance(par, dict) else {}
    vals = [v for k, v in d.items() if k != "y" and isinstance(v, (int, float))]
    return f"{max(vals):.2%}" if vals else ""


def speed_table(df: pd.DataFrame) -> Table | None:
    """Every non-default gemm case (ok or not) of layer/model level with its bf16 grouped_mm base."""
    fp8 = df[(df["gemm_dtype"] != "default") & df["level"].isin(["layer", "model"])]
    if fp8.empty:
        return None
    base = df[(df["gemm_dtype"] == "default") & (df["backend_label"] == BASE) & (df["status"] == "ok")]
    base = base.drop_duplicates(MATCH, keep="last").set_index(MATCH)
    rows = []
    for _, r in fp8.iterrows():
        key = tuple(r[c] for c in MATCH)
        b = base["tokens_per_s"].get(key)
        b_noisy = bool(base["noisy"].get(key))
        ok = r["status"] == "ok"
        tps = r["tokens_per_s"] if ok else None
        speed = f"{tps / b:.2f}x" + (" (noisy)" if r["noisy"] or b_noisy else "") \
            if ok and isinstance(b, (int, float)) and b and tps else ""
        par = r.get("parity")
        tol = par.get("tol") if isinstance(par, dict) else None
        rows.append([str(r["model"]), r["workload"], r["backend_label"], str(r["gemm_dtype"]),
                     fmt(tps) + (" noisy" if ok and r["noisy"] else ""), fmt(b) + (" noisy" if b_noisy else ""),
                     speed,
                     _err(par, "errors") + (f" (tol {tol:.2%})" if isinstance(tol, (int, float)) else ""),
                     _err(par, "vs_naive"), _worst_grad(par, "vs_naive"), _err(par, "fp8_cost"),
                     "ok" if ok else f"{r['status']}: {r['reason']}"])
    return Table("FP8 expert GEMMs against bf16 grouped_mm",
                 ["model", "workload", "backend", "gemm dtype", "tokens/s", f"bf16 {BASE} tokens/s", "speed-up",
                  "y err vs fp8 reference", "y err vs naive", "worst grad err vs naive", "fp8 cost of the reference",
                  "status"], rows,
                 f"Speed-up: tokens/s over bf16 {BASE} (gemm dtype default) on the same model, workload, execution "
                 "mode and machine. Errors are relative (||a - b|| / ||b||) from the record's parity block "
                 "(moebench/core/parity.py): against the fp8 reference (the same quantisation, MoE in fp32; the "
                 "tolerance comes from the reference's own error), and end to end against the unquantised naive MoE "
                 "on the same inputs: what fp8 costs in accuracy. 'fp8 cost of the reference': the reference itself "
                 "against naive, the floor any fp8-rowwise implementation pays.")


def _tail_mean(curve, frac: float = 0.1) -> float | None:
    if not isinstance(curve, list) or not curve:
        return None
    v = np.asarray([x for x in curve if isinstance(x, (int, float))], dtype=float)
    return float(v[-max(1, int(len(v) * frac)):].mean()) if len(v) else None


def train_gap_table(df: pd.DataFrame) -> Table | None:
    """bf16 vs each other gemm dtype for train-run cases that share model, workload, backend and machine."""
    t = df[(df["level"] == "train-run") & (df["status"] == "ok")].copy()
    if t.empty or t["gemm_dtype"].nunique() < 2:
        return None
    t["backend_name"] = t["backend"].astype(str) + t["backend_options"].map(lambda s: "" if s == "{}" else f" {s}")
    rows = []
    for _, g in t.groupby(["model", "workload", "backend_name", "gpu"], sort=False):  # workload: with its exec
        base = g[g["gemm_dtype"] == "default"]
        if base.empty:
            continue
        b = base.iloc[-1]
        b_tail, b_val = _tail_mean(b["loss_curve"]), (b["train_run"] or {}).get("final_val_loss")
        for _, r in g[g["gemm_dtype"] != "default"].iterrows():
            tail, val = _tail_mean(r["loss_curve"]), (r["train_run"] or {}).get("final_val_loss")
            steps = (r["train_run"] or {}).get("steps")
            same = steps == (b["train_run"] or {}).get("steps")
            gap = val - b_val if same and isinstance(val, float) and isinstance(b_val, float) else None
            rows.append([str(r["model"]), r["workload"], r["backend_name"], str(r["gemm_dtype"]), fmt(steps),
                         fmt(b_tail), fmt(tail),
                         fmt(b_val), fmt(val), fmt(gap), f"{gap / b_val:+.2%}" if gap is not None and b_val else "",
                         "" if same else "different step counts: no gap"])
    if not rows:
        return None
    return Table("Training: bf16 vs fp8 expert GEMMs after the same steps",
                 ["model", "workload", "backend", "gemm dtype", "steps", "bf16 train loss (last 10%)", "train loss (last 10%)",
                  "bf16 final val loss", "final val loss", "val loss gap", "relative gap", "note"], rows,
                 "Same model, seed, data and schedule; only the expert GEMMs' dtype differs. Train loss: the mean "
                 "of the last 10% of steps' total loss; val loss: the last evaluation. Gap = this - bf16 (positive: "
                 "fp8 trained worse). The loss curves are in the training section.")


def gemm_section(df: pd.DataFrame) -> Section | None:
    if "gemm_dtype" not in df or not (df["gemm_dtype"] != "default").any():
        return None
    tables = [t for t in (speed_table(df), train_gap_table(df)) if t is not None]
    text = ["The expert GEMMs' dtype is an axis of its own (workload.gemm_dtype; moebench.gemm_dtypes.GEMM_DTYPES): "
            "`default` runs them in the workload's dtype; `fp8-rowwise` quantises activations per row and weights "
            "per output column to e4m3 inside the timed step, with a bf16 backward; `fp8-rowwise-fp8bwd` also "
            "quantises the backward GEMMs (torchao's recipe). Elsewhere in the report a non-default gemm dtype is "
            "part of the backend's label, e.g. `grouped_mm [fp8-rowwise]`, so it sits beside bf16 in every panel."]
    if not tables:
        text.append("No fp8 case has a bf16 counterpart or a train-run pair here.")
    return Section("gemm", "Expert-GEMM dtype (FP8)", text, tables=tables)
