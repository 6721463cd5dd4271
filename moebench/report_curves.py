"""Report plots of balance and learning, and of scaling sweeps: MaxVio/CV per router, per-expert load heatmaps
(layer x expert), training curves (loss, and MaxVio per step when a record carries it), scaling curves (time
against work). Each returns a list of plots: panels beyond what one figure holds legibly (at most MAX_ASPECT
times taller than wide) go to further figures, named `<name>`, `<name>-2`, ..."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from moebench.reportparts import COLORS, Plot, chunks, color_map
from moebench.reportparts import png as _png

REFERENCE = "naive"
MAX_PANELS = 12  # heatmaps / training / scaling panels drawn at most; the caption says how many were left out
HEAT_MAX = 3.0   # load / mean load at which the heatmap colour saturates
_color = color_map


def _name(stem: str, i: int) -> str:
    return stem if i == 1 else f"{stem}-{i}"


def _curve(v, key: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """A per-step series as (steps, values): a list of numbers (step 1..n), of [step, value] pairs, or of
    {"step": .., key: ..} dicts. None when it is none of these or has fewer than 2 finite points."""
    if not isinstance(v, list) or len(v) < 2:
        return None
    try:
        if all(isinstance(x, (int, float)) or x is None for x in v):
            xs, ys = np.arange(1, len(v) + 1), np.asarray([np.nan if x is None else x for x in v], dtype=float)
        elif all(isinstance(x, (list, tuple)) and len(x) == 2 for x in v):
            xs, ys = np.asarray([x[0] for x in v], float), np.asarray([x[1] for x in v], float)
        elif key and all(isinstance(x, dict) and "step" in x and key in x for x in v):
            xs = np.asarray([x["step"] for x in v], float)
            ys = np.asarray([np.nan if x[key] is None else x[key] for x in v], float)
        else:
            return None
    except (TypeError, ValueError):
        return None
    ok = np.isfinite(ys) & np.isfinite(xs)
    return (xs[ok], ys[ok]) if ok.sum() >= 2 else None



BALANCE_ROWS = 36      # bars per balance figure (10 in wide, 0.32 in per bar)
HEAT_HEIGHT_IN = 13.0  # heatmaps per figure: as many as fit this height (the figure is 10 in wide)
TRAIN_PANELS = 4       # training panels per figure (2.6 in each)
SCALING_PANELS = 4     # scaling panels per figure (3.2 in each)


def plot_balance(df: pd.DataFrame) -> list[Plot]:
    b = df[(df["status"] == "ok") & df["maxvio"].notna()].copy()
    if b.empty:
        return []
    b["label"] = b["model"].astype(str) + " · " + b["router"] + np.where(
        b["routing"] == "learned", "", " · routing " + b["routing"].astype(str)) + " · " + \
        b["level"].astype(str) + "/" + b["mode"].astype(str)
    g_all = b.groupby("label", sort=False)[["maxvio", "cv"]].median()
    parts = chunks(list(range(len(g_all))), BALANCE_ROWS)
    out = []
    for i, idx in enumerate(parts, 1):
        g = g_all.iloc[idx]
        fig = Figure(figsize=(10, 1.2 + 0.32 * len(g)))
        for k, (col, name) in enumerate((("maxvio", "MaxVio (global)"), ("cv", "CV of expert load"))):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.barh(range(len(g)), g[col], color=COLORS[k])
            ax.set_yticks(range(len(g)), g.index if k == 0 else [""] * len(g), fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(name)
            ax.grid(axis="x", alpha=0.3)
        part = f" ({i} of {len(parts)})" if len(parts) > 1 else ""
        out.append(Plot(_name("balance", i), "Balance per router" + part,
                        "MaxVio = (max load - mean load) / mean load and CV = std/mean of the tokens per expert, per "
                        "layer summed over the timed steps, then averaged over layers (median across backends). "
                        "'routing zipf/hot/uniform' rows use a synthetic routing table, not the router.", _png(fig)))
    return out


def plot_heatmaps(df: pd.DataFrame) -> list[Plot]:
    h = df[(df["status"] == "ok") & df["counts_global"].map(lambda v: isinstance(v, list) and len(v) > 0)].copy()
    if h.empty:
        return []
    h["label"] = h["model"].astype(str) + " · " + h["router"] + " · routing " + h["routing"].astype(str)
    h = h.sort_values("backend", key=lambda s: s != REFERENCE, kind="stable").drop_duplicates("label")
    shown = h.head(MAX_PANELS)
    mats = []
    for v in shown["counts_global"]:
        a = np.asarray(v, dtype=float)
        a = a[None, :] if a.ndim == 1 else a
        mean = a.mean(axis=1, keepdims=True)
        mats.append(np.divide(a, mean, out=np.zeros_like(a), where=mean > 0))
    groups, cur, used = [], [], 0.3
    for i, m in enumerate(mats):  # as many heatmaps per figure as fit HEAT_HEIGHT_IN
        hgt = 0.3 * m.shape[0] + 0.35 + 0.75
        if cur and used + hgt > HEAT_HEIGHT_IN:
            groups.append(cur)
            cur, used = [], 0.3
        cur.append(i)
        used += hgt
    groups.append(cur)
    left = len(h) - len(shown)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=HEAT_MAX)  # white = even load, blue = under, red = over
    out = []
    for n, idx in enumerate(groups, 1):
        ms = [mats[i] for i in idx]
        heights = [0.3 * m.shape[0] + 0.35 for m in ms]
        fig = Figure(figsize=(10, sum(heights) + 0.75 * len(ms) + 0.3))
        axes = fig.subplots(len(ms), 1, squeeze=False, gridspec_kw={"height_ratios": heights, "hspace": 0.9})[:, 0]
        over = any(float(m.max()) > HEAT_MAX for m in ms)
        for ax, m, label in zip(axes, ms, shown["label"].iloc[idx]):
            im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_title(label, fontsize=8, loc="left")
            ax.set_ylabel("layer", fontsize=8)
            L, E = m.shape
            ax.set_yticks(range(L) if L <= 16 else range(0, L, max(1, L // 8)))
            ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
            ax.tick_params(labelsize=7)
        axes[-1].set_xlabel("expert")
        fig.colorbar(im, ax=list(axes), label="load / mean load", shrink=0.9, extend="max" if over else "neither")
        part = f" ({n} of {len(groups)})" if len(groups) > 1 else ""
        out.append(Plot(_name("expert_load", n), "Per-expert load (layer x expert)" + part,
                        "Tokens routed to each expert, summed over the timed steps, divided by the layer's mean "
                        f"(1 = perfectly even, white; 0 = a dead expert; {HEAT_MAX:g} or more, the darkest red)."
                        + (f" {left} more configuration(s) not drawn." if left and n == len(groups) else ""),
                        _png(fig)))
    return out


def plot_training(df: pd.DataFrame) -> list[Plot]:
    t = df[(df["status"] == "ok") & df["loss_curve"].map(lambda v: _curve(v) is not None)].copy()
    if t.empty:
        return []
    t["panel"] = t["suite"].astype(str) + " · " + t["workload"]
    t["line"] = ""
    for _, g in t.groupby("panel", sort=False):  # name each line by what differs within its panel
        parts = [c for c in ("model", "backend_label", "router") if g[c].nunique() > 1] or ["model", "backend_label"]
        t.loc[g.index, "line"] = g[parts].astype(str).agg(" · ".join, axis=1)
    t["has_vio"] = t["maxvio_curve"].map(lambda v: _curve(v) is not None)
    all_panels = list(dict.fromkeys(t["panel"]))
    groups = chunks(all_panels[:MAX_PANELS], TRAIN_PANELS)
    ncol = 2 if t["has_vio"].any() else 1
    left = len(all_panels) - min(len(all_panels), MAX_PANELS)
    out = []
    for n, panels in enumerate(groups, 1):
        fig = Figure(figsize=(10, 2.6 * len(panels) + 0.5), layout="constrained")
        axes = fig.subplots(len(panels), ncol, squeeze=False)
        for i, p in enumerate(panels):
            _training_panel(axes[i], t[t["panel"] == p], p, ncol)
        part = f" ({n} of {len(groups)})" if len(groups) > 1 else ""
        out.append(Plot(_name("training", n), "Training curves" + part,
                        "Loss per optimizer step" + (" and MaxVio per step" if ncol == 2 else "") + " of each "
                        "training case (timed steps only for benchmark workloads)."
                        + (f" {left} more panel(s) not drawn." if left and n == len(groups) else ""), _png(fig)))
    return out


def _training_panel(axes, sub: pd.DataFrame, title: str, ncol: int) -> None:
    col = _color(list(dict.fromkeys(sub["line"])))
    for _, r in sub.iterrows():
        axes[0].plot(*_curve(r["loss_curve"]), color=col[r["line"]], label=r["line"], linewidth=1.2)
        val = _curve(r["val_curve"], "val_loss")
        if val is not None:  # dashed, same colour; named once in the panel title
            axes[0].plot(*val, color=col[r["line"]], linestyle="--", marker="o", markersize=3)
        if r["has_vio"]:
            axes[1].plot(*_curve(r["maxvio_curve"]), color=col[r["line"]], label=r["line"], linewidth=1.2)
    has_val = sub["val_curve"].map(lambda v: _curve(v, "val_loss") is not None).any()
    axes[0].set_title(title + (" (dashed: validation loss)" if has_val else ""), fontsize=8, loc="left")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=7, framealpha=0.6)
    axes[0].grid(alpha=0.3)
    axes[0].set_xlabel("step", fontsize=8)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if ncol == 2 and sub["has_vio"].any():
        axes[1].set_ylabel("MaxVio per batch")
        axes[1].set_xlabel("step", fontsize=8)
        axes[1].grid(alpha=0.3)
    elif ncol == 2:
        axes[1].set_visible(False)


SWEEP_DIMS = ("tokens", "n_experts", "top_k", "d_expert", "d_model")


def find_sweeps(df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Sweeps in ok results: cases with the same suite/level/mode/dtype/routing/exec in which one shape dimension
    takes >= 3 values while the others are fixed (or, for what is left, several co-vary). Returns
    (title, x column, rows)."""
    ok = df[(df["status"] == "ok") & df["step_ms"].notna()]
    out = []
    for base, g in ok.groupby(["suite", "level", "mode", "dtype", "routing", "exec"], dropna=False, sort=False):
        head = f"{base[0]} {base[1]}/{base[2]} {base[3]} {base[4]}" + ("" if base[5] == "eager" else f" {base[5]}")
        used = set()
        for axis in SWEEP_DIMS:
            others = [d for d in SWEEP_DIMS if d != axis]
            for fixed, s in g.groupby(others, dropna=False, sort=False):
                if s[axis].nunique() >= 3:
                    used |= set(s.index)
                    desc = ", ".join(f"{k}={v}" for k, v in zip(others, fixed))
                    out.append((f"{head}: {axis} sweep ({desc})", axis, s))
        rest = g.drop(index=list(used))
        varying = [d for d in SWEEP_DIMS if rest[d].nunique() >= 3]
        if varying:
            axis = max(varying, key=lambda d: rest[d].nunique())
            co = [d for d in SWEEP_DIMS if d != axis and rest[d].nunique() > 1]
            fixed = [d for d in SWEEP_DIMS if rest[d].nunique() == 1]
            same = (g[fixed] == rest[fixed].iloc[0]).all(axis=1) if fixed else g.index == g.index
            out.append((f"{head}: {axis} sweep"
                        + (f" ({', '.join(co)} vary with it)" if co else ""), axis, g[same]))
    # one point per backend and x: cases of the same shape under two model names are drawn once
    return [(t, a, s.drop_duplicates(["backend_label", a, "work_gflop"])) for t, a, s in out]


def plot_scaling(df: pd.DataFrame) -> list[Plot]:
    sweeps = find_sweeps(df)[:MAX_PANELS]
    groups = chunks(sweeps, SCALING_PANELS) if sweeps else []
    out = []
    for n, group in enumerate(groups, 1):
        fig = Figure(figsize=(10, 3.2 * len(group) + 0.4), layout="constrained")
        axes = fig.subplots(len(group), 1, squeeze=False)[:, 0]
        for ax, (title, axis, s) in zip(axes, group):
            _scaling_panel(ax, title, axis, s)
        part = f" ({n} of {len(groups)})" if len(groups) > 1 else ""
        out.append(Plot(_name("scaling", n), "Scaling: time against work" + part,
                        "Median step time against the counted work per step (or the swept dimension when the work "
                        "is held fixed), log-log, per backend.", _png(fig)))
    return out


def _scaling_panel(ax, title: str, axis: str, s: pd.DataFrame) -> None:
    by_work = s["work_gflop"].notna().all() and s["work_gflop"].nunique() >= 3
    x = "work_gflop" if by_work else axis
    col = dict(zip(s["backend_label"], s["color"]))
    for b, sub in s.groupby("backend_label"):
        sub = sub.sort_values(x)
        ax.plot(sub[x], sub["step_ms"], marker="o", color=col[b], label=b, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for a in (ax.xaxis, ax.yaxis):
        a.set_major_locator(LogLocator(subs=(1, 2, 5)))
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(NullFormatter())
    ax.set_xlabel("work per step (GFLOP)" if by_work else axis)
    ax.set_ylabel("step time (ms, median)")
    ax.set_title(title, fontsize=8, loc="left")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
