"""Report sections on speed and memory: small multiples of throughput and peak memory per case, and execution
modes (eager vs CUDA graphs vs torch.compile) side by side, with every noisy record marked as such.

Input: the report's frame (moebench.report.frame, one row per case as a reader sees it, with `color`).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moebench import metrics, multiples
from moebench.multiples import Bar, Panel
from moebench.reportparts import Plot, Section, Table, fmt, png, si

BASES = ("naive", "grouped_mm")   # the first present in a panel is its base
EXEC_ORDER = ("eager", "compile", "graphs", "compile-graphs")
LEVEL_ORDER = ("layer", "model", "train-run")


def base_of(backends) -> str | None:
    present = set(backends)
    return next((b for b in BASES if b in present), None)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _order(df: pd.DataFrame) -> list[tuple]:
    """Figure groups (level, mode, exec, machine) in reading order: the machine with the most records first, then
    layer before model, train before forward, eager before compile before graphs."""
    keys = list(dict.fromkeys(zip(df["level"], df["mode"], df["exec"], df["gpu"])))
    machines = list(df["gpu"].value_counts().index)

    def pos(v, order):
        return order.index(v) if v in order else len(order)
    return sorted(keys, key=lambda k: (pos(k[3], machines), pos(k[0], LEVEL_ORDER), pos(k[1], ("train", "forward")),
                                       pos(k[2], EXEC_ORDER)))


def _group_title(key: tuple, many_gpus: bool) -> str:
    level, mode, ex, gpu = key
    return f"{level} · {mode} · {ex}" + (f" · {gpu}" if many_gpus else "")


def _panel_title(r) -> str:
    return f"{r['model']}\n{r['dtype']} {r['batch']}x{r['seq']} {r['routing']}"


def _figures(panels_by_group: list[tuple[tuple, list[Panel]]], stem: str, what: str, xlabel: str,
             caption: str, many: bool) -> list[Plot]:
    plots = []
    for key, panels in panels_by_group:
        figs = multiples.layout(panels)
        for i, chunk in enumerate(figs, 1):
            part = f" ({i} of {len(figs)})" if len(figs) > 1 else ""
            title = f"{what}: {_group_title(key, many)}{part}"
            fig = multiples.figure(chunk, xlabel, title)
            plots.append(Plot(f"{stem}-{_slug(_group_title(key, many))}-{i}", title, caption, png(fig, tight=False)))
    return plots


def _groups(df: pd.DataFrame, panel) -> list[tuple[tuple, list[Panel]]]:
    """(figure group, its panels): one panel per model and workload, made by panel(rows of that case)."""
    out = []
    for key in _order(df):
        g = df[(df["level"] == key[0]) & (df["mode"] == key[1]) & (df["exec"] == key[2]) & (df["gpu"] == key[3])]
        out.append((key, [panel(c) for _, c in g.groupby(["model", "workload_base"], sort=False)]))
    return out


def _tps_panel(c: pd.DataFrame) -> Panel:
    base = base_of(c["backend_label"]) if len(c) > 1 else None  # one bar: nothing to compare with
    ref = float(c.loc[c["backend_label"] == base, "tokens_per_s"].iloc[0]) if base else None
    bars = []
    for _, r in c.iterrows():
        is_base = r["backend_label"] == base
        noisy = bool(r["noisy"]) or bool(c.loc[c["backend_label"] == base, "noisy"].astype(bool).any()) if base \
            else bool(r["noisy"])
        note = "base" if is_base else (f"{r['tokens_per_s'] / ref:.2f}x" + (" (noisy)" if noisy else "") if ref else "")
        bars.append(Bar(r["backend_label"], float(r["tokens_per_s"]), r["color"], _num(r["tps_lo"]),
                        _num(r["tps_hi"]), note, is_base, "noisy" if r["noisy"] else ""))
    return Panel(_panel_title(c.iloc[0]), bars)


def _mem_panel(c: pd.DataFrame) -> Panel:
    okc = c[c["status"] == "ok"]
    base = base_of(okc["backend_label"]) if len(c) > 1 else None
    ref = float(okc.loc[okc["backend_label"] == base, "peak_gib"].iloc[0]) if base else None
    bars = []
    for _, r in c.iterrows():
        is_base = r["backend_label"] == base
        oom = r["status"] == "oom"
        note = "base" if is_base else (f"{r['peak_gib'] / ref:.2f}x" if ref and not oom else "")
        bars.append(Bar(r["backend_label"], float(r["peak_gib"]), r["color"], note=note, base=is_base,
                        flagged="oom" if oom else ""))
    budget = c["memory_budget_gib"].dropna()
    lines = [(float(budget.iloc[0]), f"budget {float(budget.iloc[0]):g} GiB")] if len(budget) else []
    return Panel(_panel_title(c.iloc[0]), bars, lines)


def throughput_section(df: pd.DataFrame) -> Section | None:
    ok = df[(df["status"] == "ok") & df["tokens_per_s"].notna()]
    if ok.empty:
        return None
    has_ci = ok["interval"].eq("95% CI").any()
    caption = ("Median tokens/s per backend; whisker: " + ("the record's 95% interval of the median (older records "
               "without one: p20-p80 of the timed steps)" if has_ci else "p20-p80 of the timed steps")
               + "; the number on each bar is its speed-up over the panel's base (naive where it ran, else "
               "grouped_mm; outlined, `base`). Hatched, pale bars marked `noisy` are records whose timing was not "
               "pinned down (the reason is in the full results table): read them as rough.")
    text = [(f"One panel per model and workload, grouped by level, mode and execution mode; {len(ok)} ok cases. "
            "Each panel has its own x axis (shapes differ by orders of magnitude).")]
    noisy = int(ok["noisy"].astype(bool).sum())
    if noisy:
        text.append(f"{noisy} of {len(ok)} ok records are flagged noisy (hatched).")
    plots = _figures(_groups(ok, _tps_panel), "throughput", "Throughput", "tokens/s", caption,
                     ok["gpu"].nunique() > 1)
    return Section("throughput", "Throughput per case", text, plots)


def memory_section(df: pd.DataFrame) -> Section | None:
    mem = df[df["status"].isin(["ok", "oom"]) & df["peak_gib"].notna()]
    text = []
    if "memory_note" in df:  # peaks that are not the step's (metrics.memory.not_the_step): left out, said why
        left = df[df["memory_note"].notna()]
        for note, g in left.groupby("memory_note"):
            text.append(f"{len(g)} record(s) from {', '.join(sorted(set(map(str, g['source'].str.rsplit(':', n=1).str[0]))))} "
                        f"are left out: their peak memory was {note}.")
    if mem.empty:
        return Section("memory", "Peak memory per case", text) if text else None
    kinds = " / ".join(sorted(mem["memory_kind"].dropna().unique())) or "peak memory"
    caption = (f"{kinds} (GiB) per backend; the number on each bar is its ratio to the panel's base (outlined); "
               "hatched bars marked `oom` ran out of memory (the bar is the peak reached); a dashed line is the "
               "suite's memory budget.")
    if "CPU peak RSS" in kinds:
        caption += " On CPU this is the worker process's peak RSS (it includes the Python and torch runtime)."
    plots = _figures(_groups(mem, _mem_panel), "memory", "Peak memory", "GiB", caption, mem["gpu"].nunique() > 1)
    return Section("memory", "Peak memory per case", text, plots)


# ----------------------------------------------------------------------------------------- execution modes
_num = metrics.finite


def _tps_cell(r) -> str:
    """Median tokens/s, ± the relative half-width of the record's 95% interval (older records: p20-p80)."""
    s = fmt(r["tokens_per_s"])
    hw = _num(r.get("ci_halfwidth"))
    if hw is not None and r["interval"] == "95% CI":
        s += f" ±{hw:.1%}"
    elif _num(r["tps_lo"]) is not None:
        s += f" (p20-p80 {si(r['tps_lo'])}-{si(r['tps_hi'])})"
    return s + (" noisy" if r["noisy"] else "")


def exec_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per case (model, workload without exec, backend, machine) that ran ok in eager and at least one
    other mode: the eager row's and each other mode's tokens/s, interval and noise."""
    ok = df[(df["status"] == "ok") & df["tokens_per_s"].notna()]
    rows = []
    for (model, wl, backend, gpu), g in ok.groupby(["model", "workload_base", "backend_label", "gpu"], sort=False):
        modes = {m: r for m, r in zip(g["exec"], (r for _, r in g.iterrows()))}
        if "eager" not in modes or len(modes) < 2:
            continue
        e = modes["eager"]
        row = {"model": model, "workload": wl, "backend": backend, "gpu": gpu, "level": e["level"],
               "color": e["color"], "eager": e}
        for m in EXEC_ORDER[1:]:
            row[m] = modes.get(m)
        rows.append(row)
    return pd.DataFrame(rows)


def exec_section(df: pd.DataFrame) -> Section:
    pairs = exec_pairs(df)
    ok = df[(df["status"] == "ok") & df["tokens_per_s"].notna()]
    sec = Section("exec", "Execution modes and noise")
    sec.tables.append(noise_table(ok))
    if pairs.empty:
        sec.text.append("No case ran ok both eager and under another execution mode in these inputs, so there is "
                        "no side-by-side comparison.")
        return sec
    modes = [m for m in EXEC_ORDER[1:] if pairs[m].notna().any()]
    sec.text.append("Eager PyTorch at small batches times the Python launch path; CUDA graphs replay the captured "
                    "kernels without it and torch.compile fuses them. Cases that ran ok in eager and in another mode, "
                    "side by side (a backend that syncs with the host cannot be captured in a graph: such cases are "
                    "listed under cases that did not run cleanly).")
    rows = []
    for _, p in pairs.iterrows():
        e = p["eager"]
        cells = [str(p["model"]), p["workload"], p["backend"], _tps_cell(e)]
        for m in modes:
            o = p[m]
            if o is None or (isinstance(o, float) and np.isnan(o)):
                cells += ["", ""]
                continue
            ratio = f"{o['tokens_per_s'] / e['tokens_per_s']:.2f}x"
            cells += [_tps_cell(o), ratio + (" (noisy)" if (o["noisy"] or e["noisy"]) else "")]
        rows.append(cells)
    cols = ["model", "workload", "backend", "eager tok/s ±95% CI"]
    for m in modes:
        cols += [f"{m} tok/s ±95% CI", f"{m}/eager"]
    sec.tables.insert(0, Table("Eager vs other execution modes", cols, rows,
                               "tok/s: median, ± the relative half-width of the record's 95% interval of the median "
                               "(records without one: p20-p80); "
                               "a ratio marked (noisy) has a noisy record on a side: read it as rough."))
    sec.plots.append(exec_plot(pairs, modes))
    return sec


def exec_plot(pairs: pd.DataFrame, modes: list[str]) -> Plot:
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    ax = fig.add_subplot()
    markers = {"graphs": "o", "compile": "^", "compile-graphs": "s"}
    shapes = {"layer": 1.0, "model": 1.0}
    for _, p in pairs.iterrows():
        e = p["eager"]
        for m in modes:
            o = p[m]
            if o is None or (isinstance(o, float) and np.isnan(o)):
                continue
            x, y = float(e["tokens_per_s"]), float(o["tokens_per_s"]) / float(e["tokens_per_s"])
            lo = _num(o["tps_lo"]) / _num(e["tps_hi"]) if _num(o["tps_lo"]) and _num(e["tps_hi"]) else None
            hi = _num(o["tps_hi"]) / _num(e["tps_lo"]) if _num(o["tps_hi"]) and _num(e["tps_lo"]) else None
            noisy = bool(o["noisy"] or e["noisy"])
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]] if lo and hi else None, fmt=markers.get(m, "s"),
                        color=p["color"], mfc="white" if noisy else p["color"], ms=7 * shapes.get(p["level"], 1.0),
                        elinewidth=0.8, capsize=2, alpha=0.9)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eager tokens/s (median)")
    ax.set_ylabel("tokens/s ratio to eager")
    ax.grid(alpha=0.3, which="both")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_minor_formatter(lambda v, _: f"{v:g}x" if str(f"{v:g}")[0] in "25" else "")
    backends = dict(zip(pairs["backend"], pairs["color"]))
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=b) for b, c in backends.items()]
    handles += [Line2D([], [], color="grey", marker=markers.get(m, "s"), linestyle="", label=f"{m} / eager")
                for m in modes]
    handles.append(Line2D([], [], color="grey", marker="o", mfc="white", linestyle="", label="noisy (either side)"))
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    return Plot("exec-modes", "Execution modes: speed-up over eager",
                "Each point is one case and backend: its tokens/s under CUDA graphs (circles) or torch.compile "
                "(triangles) divided by its eager tokens/s, against the eager tokens/s; whiskers from the two 95% "
                "intervals; hollow points have a noisy record on a side. Small, launch-bound steps gain most.",
                png(fig))


def noise_table(ok: pd.DataFrame) -> Table:
    rows = []
    for ex in [m for m in EXEC_ORDER if m in set(ok["exec"])] + sorted(set(ok["exec"]) - set(EXEC_ORDER)):
        g = ok[ok["exec"] == ex]
        n = int(g["noisy"].astype(bool).sum())
        hw = g["ci_halfwidth"].dropna().astype(float)
        rows.append([ex, str(len(g)), str(n), f"{n / len(g):.0%}" if len(g) else "",
                     f"{hw.median():.2%}" if len(hw) else "(no interval recorded)"])
    return Table("Noisy records per execution mode", ["exec", "ok records", "noisy", "share", "median ±95% CI"],
                 rows, "noisy: the record's timing did not reach its precision target, spread over 10%, drifted over "
                 "5% or shared the device (moebench.metrics.noise); each one's reason is in the full results table. "
                 "±95% CI: the median relative half-width of the interval of the median step time.")
