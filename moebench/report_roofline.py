"""Report section: layer cases on a roofline (moebench.roofline's FLOP and minimum-byte model) against the
ceilings measured in the same run (env `ceiling_tflops`: dense bf16 matmul; env `copy_gbps`: device-to-device
copy, read + write bytes / time), with each case's share of its roof, of the measured ceiling and of the
datasheet peak."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from moebench import roofline
from moebench.reportparts import Plot, Section, Table, fmt, pct, png

MARKERS = {"eager": "o", "graphs": "D", "compile": "^", "compile-graphs": "s"}


def placed(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Ok layer rows with the model's FLOPs, bytes and intensity, achieved TFLOP/s (model FLOPs / median step
    time) and, where the record's env has both ceilings, the roof at its intensity. Also: how many ok layer rows
    lack env.copy_gbps (not placed)."""
    lay = df[(df["status"] == "ok") & df["roofline"].notna() & df["step_ms"].notna()].copy()
    if lay.empty:
        return lay, 0
    lay["rf_flops"] = lay["roofline"].map(lambda m: m.flops)
    lay["rf_bytes"] = lay["roofline"].map(lambda m: m.bytes)
    lay["intensity"] = lay["rf_flops"] / lay["rf_bytes"]
    lay["achieved"] = lay["rf_flops"] / (lay["step_ms"].astype(float) / 1e3) / 1e12
    has = lay["copy_gbps"].notna() & lay["ceiling_tflops"].notna()
    missing = int((~has).sum())
    lay = lay[has].copy()
    lay["roof"] = [roofline.attainable_tflops(i, float(c), float(b)) for i, c, b in
                   zip(lay["intensity"], lay["ceiling_tflops"], lay["copy_gbps"])]
    return lay, missing


def roofline_section(df: pd.DataFrame) -> Section | None:
    if not (df["roofline"].notna() & (df["status"] == "ok")).any():
        return None
    lay, missing = placed(df)
    sec = Section("roofline", "Roofline (layer cases)")
    sec.text.append("Each layer case's FLOPs and minimum bytes come from moebench/roofline.py (router, permutation, "
                    "expert GEMMs forward, dX and dW; every input read once, every output written once, nothing in "
                    "between leaving the chip). Achieved TFLOP/s = those FLOPs / the median step time (the router "
                    "included, so slightly above the counted TFLOP/s of the results table). The roof is "
                    "min(ceiling, intensity x bandwidth) with both measured in the same run: env.ceiling_tflops "
                    "(dense bf16 matmul) and env.copy_gbps (device-to-device copy).")
    if missing:
        sec.text.append(f"{missing} ok layer record(s) have no env.copy_gbps (recorded before moebench measured the "
                        "copy bandwidth) and are not placed on the roofline.")
    if lay.empty:
        return sec
    for gpu, g in lay.groupby("gpu", sort=False):
        sec.plots.append(plot(g, str(gpu), slug=f"roofline-{len(sec.plots) + 1}"))
    sec.tables.append(table(lay))
    return sec


def plot(g: pd.DataFrame, gpu: str, slug: str) -> Plot:
    ceil, bw = float(g["ceiling_tflops"].median()), float(g["copy_gbps"].median())
    sheet = g["datasheet_tflops"].dropna()
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = float(g["intensity"].min()) / 2, float(g["intensity"].max()) * 2
    ridge = ceil / bw * 1e3
    xs = np.geomspace(min(lo, ridge / 1.5), max(hi, ridge * 2), 200)
    ax.plot(xs, [roofline.attainable_tflops(x, ceil, bw) for x in xs], color="black", linewidth=1.6,
            label=f"measured roof: {ceil:.0f} TFLOP/s, {bw:.0f} GB/s (median of {len(g)} records)")
    if len(sheet):
        ax.axhline(float(sheet.iloc[0]), color="grey", linestyle=":", linewidth=1.2,
                   label=f"datasheet bf16 peak {float(sheet.iloc[0]):g} TFLOP/s")
    for _, r in g.iterrows():
        noisy = bool(r["noisy"])
        ax.plot([r["intensity"]], [r["achieved"]], marker=MARKERS.get(r["exec"], "s"), color=r["color"],
                mfc="white" if noisy else r["color"], ms=6.5, linestyle="", alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for a in (ax.xaxis, ax.yaxis):
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("arithmetic intensity (FLOP per byte of minimum traffic)")
    ax.set_ylabel("achieved TFLOP/s (model FLOPs / median step time)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{gpu}: layer cases", fontsize=10, loc="left")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color=c, marker="o", linestyle="", label=b)
                for b, c in dict(zip(g["backend_label"], g["color"])).items()]
    handles += [Line2D([], [], color="grey", marker=MARKERS.get(e, "s"), linestyle="", label=e)
                for e in dict.fromkeys(g["exec"])]
    if g["noisy"].astype(bool).any():
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", linestyle="", label="noisy"))
    ax.legend(handles=handles, fontsize=7.5, loc="lower right", framealpha=0.85)
    return Plot(slug, f"Roofline: {gpu}",
                f"Layer cases on {gpu}: colour = backend, marker = execution mode, hollow = noisy record. Cases left "
                "of the ridge are bound by memory traffic even when ideal; the gap below the roof is what an "
                "implementation leaves (extra traffic, launch and host gaps, idle SMs).", png(fig))


def table(lay: pd.DataFrame) -> Table:
    rows = []
    for _, r in lay.iterrows():
        rows.append([str(r["model"]), r["workload"], r["backend_label"], f"{r['intensity']:.0f}",
                     fmt(r["achieved"]), fmt(r["roof"]), pct(r["achieved"] / r["roof"]),
                     pct(r["achieved"] / float(r["ceiling_tflops"])),
                     pct(r["achieved"] / float(r["datasheet_tflops"])) if pd.notna(r["datasheet_tflops"]) else "",
                     "noisy" if r["noisy"] else ""])
    return Table("Roofline placement", ["model", "workload", "backend", "FLOP/B", "TFLOP/s (model)", "roof TFLOP/s",
                                        "% of roof", "% of measured ceiling", "% of datasheet", "noisy"], rows,
                 "% of measured ceiling = model TFLOP/s / env.ceiling_tflops of the same record (the dense bf16 matmul "
                 "rate measured in that run, not metrics.mfu_measured); % of datasheet: against "
                 "moebench.metrics.datasheet_peak of the record's GPU.")
