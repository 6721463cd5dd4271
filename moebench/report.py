"""`moebench report`: results JSONL -> report.md, a self-contained index.html and PNG plots.

    moebench report results/a.jsonl results/b.jsonl -o reports/mine

Plots (matplotlib, Agg, no pyplot state), each drawn only when its data exists, never an empty figure:
throughput per model x backend, speed-up over naive, peak memory (with the suite's budget line), TFLOP/s
(with the ceiling measured in the run), balance per router (MaxVio, CV), per-expert load heatmaps
(layer x expert), training curves (loss, and MaxVio per step when a record carries it), scaling curves
(time against work) when the results hold a sweep. Tables: results, every non-ok case with its reason, the
env block of each run, the seed-claims table (when moebench.claims exists and the `seeds` suite is present),
and every problem found while reading the inputs (file:line).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from moebench import results

TEMPLATES = Path(__file__).resolve().parent / "templates"
REFERENCE = "naive"
MAX_PANELS = 12
HEAT_MAX = 3.0   # load / mean load at which the heatmap colour saturates  # heatmaps / training panels; the caption says how many were left out
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
          "#CCB974", "#64B5CD"]


class NoUsableRecords(ValueError):
    """Nothing in the inputs could be used (the message lists the problems)."""


@dataclass
class Plot:
    name: str       # file stem under plots/
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Report:
    inputs: list[str]
    counts: dict
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- data
def router_label(r: dict) -> str:
    """A short name for a router configuration: scoring, balance strategy and its options."""
    parts = [str(r["kind"])] if r.get("kind") not in (None, "token_choice", "topk") else []
    parts.append(r.get("scoring", "softmax"))
    bal = r.get("balance", "none")
    parts.append({"aux": f"aux a={r.get('aux_alpha')}", "bias": f"bias u={r.get('bias_rate')}"}.get(bal, "no balancing")
                 if bal in ("aux", "bias", "none") else str(bal))
    if (r.get("n_group") or 1) > 1:
        parts.append(f"groups {r.get('topk_group')}/{r.get('n_group')}")
    if r.get("z_loss"):
        parts.append(f"z={r['z_loss']}")
    if r.get("capacity_factor"):
        parts.append(f"cf={r['capacity_factor']}")
    return " ".join(parts)


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


def _first(d: dict, *paths: str):
    """The first present value among dotted paths in a nested dict."""
    for p in paths:
        cur = d
        for k in p.split("."):
            cur = cur.get(k) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def frame(records: list[dict]) -> pd.DataFrame:
    """results.to_frame plus the columns the report needs (budget, ceiling, work, router, curves, loads)."""
    df = results.to_frame(records)
    if df.empty:
        return df
    extra = []
    for r in records:
        c, m, env = r.get("case") or {}, r.get("metrics") or {}, r.get("env") or {}
        w, mod = c.get("workload") or {}, c.get("model") or {}
        mem = m.get("memory") or {}
        opts = c.get("backend_options") or {}
        tokens = (w.get("batch") or 0) * (w.get("seq") or 0)
        fpt = m.get("flops_per_token")
        extra.append({
            "backend_label": (c.get("backend") or "?") + "".join(f",{k}={v}" for k, v in sorted(opts.items()))
            + (f" [{m['weight_layout']} weights]" if m.get("weight_layout", "canonical") != "canonical" else ""),
            "workload": f"{w.get('level')}/{w.get('mode')} {w.get('dtype')} {w.get('batch')}x{w.get('seq')} "
                        f"{w.get('routing')}",
            "group_key": json.dumps({"model": mod, "workload": w}, sort_keys=True),
            "router": router_label(mod.get("router") or {}),
            "memory_budget_gib": c.get("memory_budget_gib"),
            "memory_kind": "GPU peak allocated" if "peak_allocated_gib" in mem
            else ("CPU peak RSS" if "peak_rss_gib" in mem else None),
            "ceiling_tflops": env.get("ceiling_tflops"), "ceiling_what": env.get("ceiling"),
            "spread": m.get("spread"),
            "work_gflop": fpt * tokens / 1e9 if isinstance(fpt, (int, float)) and tokens else None,
            "counts_global": _first(m, "balance.counts_global"),
            "loss_curve": m.get("loss_curve"),
            "val_curve": m.get("val_curve"),             # train-run: [{step, val_loss, maxvio_global}]
            "maxvio_curve": _first(m, "maxvio_batch", "maxvio_curve"),  # per-step MaxVio (mean over layers)
            "train_run": m.get("train_run"),
        })
    return pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """One row per case as a reader sees it (model, workload, backend, machine): the last record read wins,
    so a resumed or repeated run is drawn once; rows keep the order in which cases first appear."""
    key = ["model", "workload", "backend_label", "gpu"]
    ident = df[key].astype(str).agg(" | ".join, axis=1)
    first = {k: i for i, k in reversed(list(enumerate(ident)))}
    keep = df[~ident.duplicated(keep="last")]
    return keep.iloc[np.argsort([first[k] for k in ident[keep.index]], kind="stable")]


def _groups(df: pd.DataFrame) -> pd.DataFrame:
    """Adds `row`, the label of a case minus its backend (model . workload [. machine when several]), and
    `color`, the backend's colour."""
    df = df.copy()
    many = df["gpu"].nunique(dropna=True) > 1
    df["row"] = df["model"].astype(str) + " · " + df["workload"] + (" · " + df["gpu"].astype(str) if many else "")
    backends = sorted(df["backend_label"].unique(), key=lambda b: (b != REFERENCE, b))
    df["color"] = df["backend_label"].map(_color(backends))  # one colour per backend in every plot
    return df


# ---------------------------------------------------------------------------------------------- plots
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _color(names: list[str]) -> dict[str, str]:
    return {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}


def _barh(df: pd.DataFrame, value: str, xlabel: str, *, lo: str | None = None, hi: str | None = None,
          log: bool = False, vlines: list[tuple[float, str, str]] = (), hatch: str | None = None) -> Figure:
    """Grouped horizontal bars: one block per `row`, one bar per backend; optional p20-p80 whiskers."""
    rows = list(dict.fromkeys(df["row"]))
    backends = sorted(df["backend_label"].unique(), key=lambda b: (b != REFERENCE, b))
    col = dict(zip(df["backend_label"], df["color"]))
    nb = len(backends)
    h = 0.8 / nb
    fig = Figure(figsize=(10, 1.2 + len(rows) * (0.25 + 0.22 * nb)))
    ax = fig.add_subplot()
    for j, b in enumerate(backends):
        sub = df[df["backend_label"] == b]
        ys, xs, errs, hatches = [], [], [[], []], []
        for _, r in sub.iterrows():
            i = rows.index(r["row"])
            ys.append(i + (j - (nb - 1) / 2) * h)
            xs.append(r[value])
            if lo and hi:
                errs[0].append(max(0.0, r[value] - r[lo]) if pd.notna(r[lo]) else 0.0)
                errs[1].append(max(0.0, r[hi] - r[value]) if pd.notna(r[hi]) else 0.0)
            hatches.append(bool(r[hatch]) if hatch else False)
        bars = ax.barh(ys, xs, height=h * 0.92, color=col[b], label=b,
                       xerr=np.asarray(errs) if lo and hi else None, error_kw={"elinewidth": 0.8, "capsize": 2})
        for bar, hatched in zip(bars, hatches):
            if hatched:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
    for x, label, style in vlines:
        ax.axvline(x, color="black", linestyle=style, linewidth=1.2, label=label)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if log:
        ax.set_xscale("log")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.5 / fig.get_figheight()),
              ncol=min(4, nb + len(vlines)), frameon=False)
    return fig


def _spans_decades(s: pd.Series) -> bool:
    s = s[s > 0]
    return len(s) > 1 and s.max() / s.min() > 30


def plot_throughput(df: pd.DataFrame) -> Plot | None:
    ok = df[(df["status"] == "ok") & df["tokens_per_s"].notna()]
    if ok.empty:
        return None
    fig = _barh(ok, "tokens_per_s", "tokens/s (median; whiskers p20-p80)", lo="tokens_per_s_p20",
                hi="tokens_per_s_p80", log=_spans_decades(ok["tokens_per_s"]))
    return Plot("throughput", "Throughput per model x backend",
                "Median tokens/s of each ok case; whiskers span p20 to p80 of the timed steps.", _png(fig))


def plot_speedup(df: pd.DataFrame) -> Plot | None:
    ok = df[(df["status"] == "ok") & df["tokens_per_s"].notna()]
    ref = ok[ok["backend"] == REFERENCE].set_index("row")["tokens_per_s"]
    other = ok[(ok["backend"] != REFERENCE) & ok["row"].isin(ref.index)].copy()
    if other.empty:
        return None
    other["speedup"] = other["tokens_per_s"] / other["row"].map(ref)
    fig = _barh(other, "speedup", f"speed-up over {REFERENCE} (tokens/s ratio)",
                vlines=[(1.0, f"{REFERENCE} = 1", "--")], log=_spans_decades(other["speedup"]))
    return Plot("speedup", f"Speed-up over {REFERENCE}",
                f"Median tokens/s of each backend divided by {REFERENCE}'s on the same model and workload.",
                _png(fig))


def plot_memory(df: pd.DataFrame) -> Plot | None:
    mem = df[df["status"].isin(["ok", "oom"]) & df["peak_gib"].notna()].copy()
    if mem.empty:
        return None
    mem["is_oom"] = mem["status"] == "oom"
    budgets = sorted({float(b) for b in mem["memory_budget_gib"].dropna()})
    kinds = " / ".join(sorted(mem["memory_kind"].dropna().unique())) or "peak memory"
    fig = _barh(mem, "peak_gib", f"{kinds} (GiB)", hatch="is_oom",
                vlines=[(b, f"suite memory budget {b:g} GiB", "--") for b in budgets])
    cap = "Peak memory of each case" + ("; hatched bars ran out of memory (status oom)" if mem["is_oom"].any() else "")
    cap += ("; the dashed line is the suite's budget." if budgets else ".")
    if "CPU peak RSS" in kinds:
        cap += " On CPU this is the worker process's peak RSS (it includes the Python and torch runtime)."
    return Plot("memory", "Peak memory", cap, _png(fig))


def plot_tflops(df: pd.DataFrame) -> Plot | None:
    ok = df[(df["status"] == "ok") & df["tflops"].notna()]
    if ok.empty:
        return None
    lines = []
    for gpu, c in ok.dropna(subset=["ceiling_tflops"]).groupby("gpu", sort=False):
        v = c["ceiling_tflops"].astype(float)
        spread = f", {v.min():.3g}-{v.max():.3g} over {len(v)} measurements" if v.nunique() > 1 else ""
        lines.append((float(v.median()), (f"measured ceiling {gpu}: {v.median():.3g} TFLOP/s "
                      f"({c['ceiling_what'].iloc[0]}{spread})"), ":"))
    fig = _barh(ok, "tflops", "TFLOP/s (counted matmul FLOPs / median step time)", vlines=lines[:6],
                log=_spans_decades(ok["tflops"]))
    return Plot("tflops", "TFLOP/s against the measured ceiling",
                "Achieved TFLOP/s (active experts only); the dotted line is the dense matmul rate measured on "
                "the same machine in the same run (the median when each worker measured its own).", _png(fig))


def plot_balance(df: pd.DataFrame) -> Plot | None:
    b = df[(df["status"] == "ok") & df["maxvio"].notna()].copy()
    if b.empty:
        return None
    b["label"] = b["model"].astype(str) + " · " + b["router"] + np.where(
        b["routing"] == "learned", "", " · routing " + b["routing"].astype(str)) + " · " + \
        b["level"].astype(str) + "/" + b["mode"].astype(str)
    g = b.groupby("label", sort=False)[["maxvio", "cv"]].median()
    fig = Figure(figsize=(10, 1.2 + 0.32 * len(g)))
    for k, (col, name) in enumerate((("maxvio", "MaxVio (global)"), ("cv", "CV of expert load"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.barh(range(len(g)), g[col], color=COLORS[k])
        ax.set_yticks(range(len(g)), g.index if k == 0 else [""] * len(g), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    return Plot("balance", "Balance per router",
                "MaxVio = (max load - mean load) / mean load and CV = std/mean of the tokens per expert, per "
                "layer summed over the timed steps, then averaged over layers (median across backends). "
                "'routing zipf/hot/uniform' rows use a synthetic routing table, not the router.", _png(fig))


def plot_heatmaps(df: pd.DataFrame) -> Plot | None:
    h = df[(df["status"] == "ok") & df["counts_global"].map(lambda v: isinstance(v, list) and len(v) > 0)].copy()
    if h.empty:
        return None
    h["label"] = h["model"].astype(str) + " · " + h["router"] + " · routing " + h["routing"].astype(str)
    h = h.sort_values("backend", key=lambda s: s != REFERENCE, kind="stable").drop_duplicates("label")
    shown = h.head(MAX_PANELS)
    mats = []
    for v in shown["counts_global"]:
        a = np.asarray(v, dtype=float)
        a = a[None, :] if a.ndim == 1 else a
        mean = a.mean(axis=1, keepdims=True)
        mats.append(np.divide(a, mean, out=np.zeros_like(a), where=mean > 0))
    heights = [0.3 * m.shape[0] + 0.35 for m in mats]
    fig = Figure(figsize=(10, sum(heights) + 0.75 * len(mats) + 0.3))
    axes = fig.subplots(len(mats), 1, squeeze=False, gridspec_kw={"height_ratios": heights, "hspace": 0.9})[:, 0]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=HEAT_MAX)  # white = even load, blue = under, red = over
    over = any(float(m.max()) > HEAT_MAX for m in mats)
    for ax, m, label in zip(axes, mats, shown["label"]):
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.set_ylabel("layer", fontsize=8)
        L, E = m.shape
        ax.set_yticks(range(L) if L <= 16 else range(0, L, max(1, L // 8)))
        ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("expert")
    fig.colorbar(im, ax=list(axes), label="load / mean load", shrink=0.9, extend="max" if over else "neither")
    left = len(h) - len(shown)
    return Plot("expert_load", "Per-expert load (layer x expert)",
                "Tokens routed to each expert, summed over the timed steps, divided by the layer's mean "
                f"(1 = perfectly even, white; 0 = a dead expert; {HEAT_MAX:g} or more, the darkest red)."
                + (f" {left} more configuration(s) not drawn." if left else ""),
                _png(fig))


def plot_training(df: pd.DataFrame) -> Plot | None:
    t = df[(df["status"] == "ok") & df["loss_curve"].map(lambda v: _curve(v) is not None)].copy()
    if t.empty:
        return None
    t["panel"] = t["suite"].astype(str) + " · " + t["workload"]
    t["line"] = ""
    for _, g in t.groupby("panel", sort=False):  # name each line by what differs within its panel
        parts = [c for c in ("model", "backend_label", "router") if g[c].nunique() > 1] or ["model", "backend_label"]
        t.loc[g.index, "line"] = g[parts].astype(str).agg(" · ".join, axis=1)
    t["has_vio"] = t["maxvio_curve"].map(lambda v: _curve(v) is not None)
    panels = list(dict.fromkeys(t["panel"]))[:MAX_PANELS]
    ncol = 2 if t["has_vio"].any() else 1
    fig = Figure(figsize=(10, 2.6 * len(panels) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), ncol, squeeze=False)
    for i, p in enumerate(panels):
        sub = t[t["panel"] == p]
        col = _color(list(dict.fromkeys(sub["line"])))
        for _, r in sub.iterrows():
            axes[i, 0].plot(*_curve(r["loss_curve"]), color=col[r["line"]], label=r["line"], linewidth=1.2)
            val = _curve(r["val_curve"], "val_loss")
            if val is not None:  # dashed, same colour; named once in the panel title
                axes[i, 0].plot(*val, color=col[r["line"]], linestyle="--", marker="o", markersize=3)
            if r["has_vio"]:
                axes[i, 1].plot(*_curve(r["maxvio_curve"]), color=col[r["line"]], label=r["line"], linewidth=1.2)
        has_val = sub["val_curve"].map(lambda v: _curve(v, "val_loss") is not None).any()
        axes[i, 0].set_title(p + (" (dashed: validation loss)" if has_val else ""), fontsize=8, loc="left")
        axes[i, 0].set_ylabel("loss")
        axes[i, 0].legend(fontsize=7, framealpha=0.6)
        axes[i, 0].grid(alpha=0.3)
        axes[i, 0].set_xlabel("step", fontsize=8)
        axes[i, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        if ncol == 2 and sub["has_vio"].any():
            axes[i, 1].set_ylabel("MaxVio per batch")
            axes[i, 1].set_xlabel("step", fontsize=8)
            axes[i, 1].grid(alpha=0.3)
        elif ncol == 2:
            axes[i, 1].set_visible(False)
    has_vio = ncol == 2
    left = len(dict.fromkeys(t["panel"])) - len(panels)
    return Plot("training", "Training curves",
                "Loss per optimizer step" + (" and MaxVio per step" if has_vio else "") + " of each training "
                "case (timed steps only for benchmark workloads)." + (f" {left} more panel(s) not drawn." if left else ""),
                _png(fig))


SWEEP_DIMS = ("tokens", "n_experts", "top_k", "d_expert", "d_model")


def find_sweeps(df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Sweeps in ok results: cases with the same suite/level/mode/dtype/routing in which one shape dimension
    takes >= 3 values while the others are fixed (or, for what is left, several co-vary). Returns
    (title, x column, rows)."""
    ok = df[(df["status"] == "ok") & df["step_ms"].notna()]
    out = []
    for base, g in ok.groupby(["suite", "level", "mode", "dtype", "routing"], dropna=False, sort=False):
        used = set()
        for axis in SWEEP_DIMS:
            others = [d for d in SWEEP_DIMS if d != axis]
            for fixed, s in g.groupby(others, dropna=False, sort=False):
                if s[axis].nunique() >= 3:
                    used |= set(s.index)
                    desc = ", ".join(f"{k}={v}" for k, v in zip(others, fixed))
                    out.append((f"{base[0]} {base[1]}/{base[2]} {base[3]}: {axis} sweep ({desc})", axis, s))
        rest = g.drop(index=list(used))
        varying = [d for d in SWEEP_DIMS if rest[d].nunique() >= 3]
        if varying:
            axis = max(varying, key=lambda d: rest[d].nunique())
            co = [d for d in SWEEP_DIMS if d != axis and rest[d].nunique() > 1]
            fixed = [d for d in SWEEP_DIMS if rest[d].nunique() == 1]
            same = (g[fixed] == rest[fixed].iloc[0]).all(axis=1) if fixed else g.index == g.index
            out.append((f"{base[0]} {base[1]}/{base[2]} {base[3]}: {axis} sweep"
                        + (f" ({', '.join(co)} vary with it)" if co else ""), axis, g[same]))
    # one point per backend and x: cases of the same shape under two model names are drawn once
    return [(t, a, s.drop_duplicates(["backend_label", a, "work_gflop"])) for t, a, s in out]


def plot_scaling(df: pd.DataFrame) -> Plot | None:
    sweeps = find_sweeps(df)[:MAX_PANELS]
    if not sweeps:
        return None
    fig = Figure(figsize=(10, 3.2 * len(sweeps) + 0.4), layout="constrained")
    axes = fig.subplots(len(sweeps), 1, squeeze=False)[:, 0]
    for ax, (title, axis, s) in zip(axes, sweeps):
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
    return Plot("scaling", "Scaling: time against work",
                "Median step time against the counted work per step (or the swept dimension when the work is "
                "held fixed), log-log, per backend.", _png(fig))


PLOTS = (plot_throughput, plot_speedup, plot_memory, plot_tflops, plot_balance, plot_heatmaps, plot_training,
         plot_scaling)


# --------------------------------------------------------------------------------------------- tables
def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, (float, np.floating)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def results_table(df: pd.DataFrame) -> Table | None:
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    many = ok["gpu"].nunique(dropna=False) > 1
    rows = []
    for _, r in ok.iterrows():
        tps = _fmt(r["tokens_per_s"])
        if pd.notna(r["tokens_per_s_p20"]):
            tps += f" ({_fmt(r['tokens_per_s_p20'])}-{_fmt(r['tokens_per_s_p80'])})"
        rows.append([str(r["model"]), r["workload"], r["backend_label"], tps, _fmt(r["step_ms"]),
                     f"{r['spread']:.0%}" if pd.notna(r["spread"]) else "", _fmt(r["tflops"]),
                     f"{r['mfu_measured']:.1%}" if pd.notna(r["mfu_measured"]) else "", _fmt(r["peak_gib"]),
                     _fmt(r["maxvio"])] + ([str(r["gpu"])] if many else []))
    machine = "" if many else f" Machine: {ok['gpu'].iloc[0]}."
    return Table("Results (ok cases)", ["model", "workload", "backend", "tokens/s (p20-p80)", "step ms", "spread",
                                        "TFLOP/s", "MFU (measured ceiling)", "peak GiB", "MaxVio"]
                 + (["machine"] if many else []), rows,
                 "spread = (p80 - p20) / p50 of the step time; MFU against the dense matmul rate measured in the "
                 "run." + machine)


TRAIN_FIELDS = (("strategy", "strategy"), ("steps", "steps"), ("final_val_loss", "final val loss"),
                ("maxvio_global", "MaxVio global"), ("maxvio_batch_last10pct", "MaxVio batch (last 10%)"),
                ("cv_global", "CV global"), ("dead_experts", "dead experts"), ("dropped_frac", "dropped"))


def train_table(df: pd.DataFrame) -> Table | None:
    t = df[df["train_run"].map(lambda v: isinstance(v, dict))]
    if t.empty:
        return None
    rows = [[str(r["model"]), r["backend_label"], r["workload"]] + [_fmt(r["train_run"].get(k)) for k, _ in TRAIN_FIELDS]
            for _, r in t.iterrows()]
    return Table("Training runs", ["model", "backend", "workload"] + [h for _, h in TRAIN_FIELDS], rows,
                 "MaxVio global: validation loads at the end, per layer then averaged over layers; MaxVio batch: "
                 "the per-step MaxVio averaged over the last 10% of steps.")


def status_table(df: pd.DataFrame) -> Table | None:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return None
    rows = [[str(r["status"]), str(r["label"]), str(r["reason"] or "(no reason recorded)"), str(r["source"])]
            for _, r in bad.iterrows()]
    return Table("Cases that did not run cleanly", ["status", "case", "reason", "record"], rows,
                 "Every skipped, mismatched, oom, timeout or failed case, with the reason recorded in its run.")


ENV_FIELDS = (("gpu", "GPU"), ("gpu_memory_gib", "GPU GiB"), ("cpu", "CPU"), ("driver", "driver"), ("cuda", "CUDA"),
              ("torch", "torch"), ("triton", "triton"), ("python", "python"), ("host", "host"),
              ("moebench", "moebench"), ("ceiling_tflops", "ceiling TFLOP/s"), ("ceiling", "ceiling measured"))


def env_table(records: list[dict]) -> Table | None:
    runs: dict[str, dict] = {}
    for r in records:
        runs.setdefault(str(r.get("run_id")), {"suite": r.get("suite"), "env": r.get("env") or {}, "n": 0})["n"] += 1
    if not runs:
        return None
    rows = []
    for run_id, info in runs.items():
        env = info["env"]
        commit = str(env.get("git_commit") or "")[:12] + (" (dirty)" if env.get("git_dirty") is True else "")
        rows.append([run_id, str(info["suite"]), str(info["n"])] + [_fmt(env.get(k)) for k, _ in ENV_FIELDS] + [commit])
    return Table("Environment of each run", ["run", "suite", "records"] + [h for _, h in ENV_FIELDS] + ["commit"], rows)


def claims_table(df: pd.DataFrame) -> Table | None:
    if "seeds" not in set(df["suite"].dropna()):
        return None
    try:
        from moebench.claims import claims_frame
    except ImportError:
        return None
    try:
        cf = claims_frame(df)
    except Exception as e:  # noqa: BLE001 - the report of a finished run must still be written; say why not
        return Table("Seed claims: claimed vs measured", ["error"],
                     [[f"moebench.claims.claims_frame failed: {type(e).__name__}: {e}"]])
    if cf is None or len(cf) == 0:
        return None
    cols = [c for c in ("seed", "claim", "compared", "claimed", "unit", "claimed_device", "measured",
                        "measured_device", "verdict", "why") if c in cf.columns]
    return Table("Seed claims: claimed vs measured", cols, [[_fmt(r[c]) for c in cols] for _, r in cf.iterrows()],
                 "Each seed system's headline claims, with the device each number was claimed and measured on.")


# --------------------------------------------------------------------------------------------- render
def paired_parts(source: str, result: dict) -> tuple[Plot | None, Table]:
    """A `moebench paired` result as a report plot (per-round speed-ups) and table (moebench/paired.py's rows)."""
    from moebench import paired as pr

    env = result.get("env") or {}
    stem = Path(source).stem.removeprefix("paired-")
    where = (f"`{source}`: {result['rounds']} interleaved rounds x {result['steps']} timed steps per case, base "
             f"{pr.base_text(result)}; {env.get('gpu') or env.get('cpu')}, commit {env.get('git_commit')}.")
    png = pr.plot(result)
    plot = Plot(f"paired-{stem}", f"Paired: {stem}", where + " Dots: per-round speed-ups; bar: their median; "
                "whisker: 95% bootstrap interval.", png) if png else None
    return plot, Table(f"Paired: {stem}", list(pr.COLUMNS), pr.rows(result), note=where)


def build(loaded: results.Loaded, inputs: list[str], paired: list[tuple[str, dict]] = ()) -> Report:
    """All plots and tables of a report, in memory; `paired`: (source, result) of `moebench paired` runs."""
    if not loaded.records:
        raise NoUsableRecords("no usable records in " + ", ".join(inputs)
                              + "".join(f"\n  {p}" for p in loaded.problems))
    df = frame(loaded.records)
    counts = df["status"].value_counts().to_dict()
    cur = _groups(latest(df))
    rep = Report(inputs=inputs, counts={s: int(counts.get(s, 0)) for s in results.STATUSES if counts.get(s)},
                 problems=list(loaded.problems))
    rep.plots = [p for f in PLOTS if (p := f(cur)) is not None]
    rep.tables = [t for t in (results_table(cur), train_table(cur), status_table(df), claims_table(df))
                  if t is not None]
    for source, result in paired:
        plot, table = paired_parts(source, result)
        rep.plots += [plot] if plot else []
        rep.tables.append(table)
        rep.inputs = rep.inputs + [source]
    if (t := env_table(loaded.records)) is not None:
        rep.tables.append(t)
    return rep


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    e = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, autoescape=False,
                    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    e.filters["md"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    e.filters["h"] = lambda s: html.escape(str(s))
    return e


def write(loaded: results.Loaded, out_dir: Path, inputs: list[str], paired: list[tuple[str, dict]] = ()) -> Report:
    """Write index.html (self-contained), report.md and plots/*.png into out_dir."""
    rep = build(loaded, inputs, paired)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "plots").glob("*.png"):  # a re-render must not leave plots whose data is gone
        old.unlink()
    for p in rep.plots:
        (out_dir / "plots" / f"{p.name}.png").write_bytes(p.png)
    env = _env()
    (out_dir / "report.md").write_text(env.get_template("report.md.j2").render(r=rep), encoding="utf-8")
    (out_dir / "index.html").write_text(env.get_template("report.html.j2").render(r=rep), encoding="utf-8")
    return rep


def render(paths: list[Path], out_dir: Path) -> None:
    """Read results files and write the report; raises NoUsableRecords when nothing can be used."""
    write(results.read(paths), out_dir, [str(p) for p in paths])
