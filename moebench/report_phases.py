"""Report section "Where the time goes": each profiled case's step split into phases (moebench.phases), one
stacked bar per backend, one panel per case. Records carry a profile only when run with `moebench run --profile
DIR`; without one the section says so and draws nothing."""
from __future__ import annotations

import json
import math
import textwrap

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from moebench import phases
from moebench.reportparts import MAX_ASPECT, Plot, Section, Table, chunks, fmt, png

PHASE_COLORS = dict(zip(phases.PHASES, ["#8172B3", "#64B5CD", "#4C72B0", "#55A868", "#CCB974", "#DD8452",
                                        "#C44E52", "#937860", "#DA8BC3", "#2F4858", "#8C8C8C", "#E5E5E5"]))
NCOLS, WIDTH_IN = 2, 11.0
NO_PROFILE = ("No record in these inputs carries a kernel profile (`metrics.profile`, written by `moebench run "
              "--profile DIR`), so no phase split is drawn. The split (router/top-k, permutation/gather, expert GEMMs "
              "forward, activation, combine, dX, dW, optimizer, idle gaps) and its kernel-name rules per backend are "
              "in moebench/phases.py, tested on constructed kernel lists (tests/test_phases.py).")


def _has_profile(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("kernels"), list) and len(v["kernels"]) > 0


def split(df: pd.DataFrame) -> pd.DataFrame:
    """One row per profiled ok case: its identity and ms per step in each phase (columns phases.PHASES)."""
    rows = []
    for _, r in df[(df["status"] == "ok") & df["profile"].map(_has_profile) & df["step_ms"].notna()].iterrows():
        opts = json.loads(r["backend_options"] or "{}")
        ms = phases.step_phases(r["profile"], float(r["step_ms"]), backend=str(r["backend"]), mode=str(r["mode"]),
                                level=str(r["level"]), dtype=str(r["dtype"]), options=opts)
        left = phases.unmatched(r["profile"], backend=str(r["backend"]), mode=str(r["mode"]), level=str(r["level"]),
                                dtype=str(r["dtype"]), options=opts)
        rows.append({"case": f"{r['model']} · {r['workload']}", "backend": r["backend_label"], "step_ms": r["step_ms"],
                     "unmatched": len(left), **ms})
    return pd.DataFrame(rows)


def phases_section(df: pd.DataFrame) -> Section:
    sec = Section("phases", "Where the time goes")
    s = split(df)
    if s.empty:
        sec.text.append(NO_PROFILE)
        return sec
    sec.text.append("Per-kernel device time from torch.profiler (a few steps right after timing), mapped to phases "
                    "by kernel name (moebench/phases.py states the rules per backend); idle gaps = median step time - "
                    "kernel time per step. A kernel that serves several phases is split by their FLOP shares.")
    sec.plots = plots(s)
    used = [p for p in phases.PHASES if s[p].sum() > 0]
    rows = [[r["case"], r["backend"], fmt(r["step_ms"])] + [fmt(r[p]) for p in used] + [str(r["unmatched"])]
            for _, r in s.iterrows()]
    sec.tables.append(Table("Step phases (ms per step)", ["case", "backend", "step ms"] + used
                            + ["unmatched kernels"], rows,
                            "unmatched kernels: names no rule covers, counted under `other kernels`."))
    return sec


def plots(s: pd.DataFrame) -> list[Plot]:
    cases = list(dict.fromkeys(s["case"]))
    tallest = max(len(s[s["case"] == c]) for c in cases)
    panel_h = 0.9 + 0.32 * tallest
    rows_fit = max(1, int((MAX_ASPECT * 0.95 * WIDTH_IN - 1.4) // panel_h))
    out = []
    groups = chunks(cases, rows_fit * NCOLS)
    for i, group in enumerate(groups, 1):
        nrows = math.ceil(len(group) / NCOLS)
        fig = Figure(figsize=(WIDTH_IN, min(1.4 + nrows * panel_h, MAX_ASPECT * 0.95 * WIDTH_IN)), layout="constrained")
        axes = fig.subplots(nrows, NCOLS, squeeze=False)
        for ax, case in zip(axes.flat, group):
            sub = s[s["case"] == case]
            left = [0.0] * len(sub)
            for p in phases.PHASES:
                vals = sub[p].tolist()
                ax.barh(range(len(sub)), vals, left=left, color=PHASE_COLORS[p], height=0.65,
                        edgecolor="white", linewidth=0.4)
                left = [a + b for a, b in zip(left, vals)]
            ax.set_yticks(range(len(sub)), sub["backend"], fontsize=7.5)
            ax.invert_yaxis()
            ax.set_xlabel("ms per step", fontsize=7.5)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title("\n".join(textwrap.wrap(case, 60)[:2]), fontsize=8, loc="left")
            ax.grid(axis="x", alpha=0.3)
        for ax in list(axes.flat)[len(group):]:
            ax.set_visible(False)
        used = [p for p in phases.PHASES if s[s["case"].isin(group)][p].sum() > 0]
        fig.legend(handles=[Patch(color=PHASE_COLORS[p], label=p) for p in used], loc="outside lower center",
                   ncol=min(6, len(used)), fontsize=7.5, frameon=False)
        part = f" ({i} of {len(groups)})" if len(groups) > 1 else ""
        out.append(Plot(f"phases-{i}", f"Where the time goes{part}",
                        "Each bar is one backend's step: device time per phase (kernel names mapped by "
                        "moebench/phases.py) and the idle gaps between kernels.", png(fig, tight=False)))
    return out
