"""Small multiples: one panel per case (model, workload), one bar per backend, split over as many figures as it
takes for each to stay legible at 100% zoom (NCOLS panels across, at most MAX_ROWS rows, never taller than
MAX_ASPECT times its width).

A bar carries its interval (drawn as a whisker), a note printed at its end (a speed-up, `base`, `oom`), and a
flag for records that are not one trustworthy number (noisy timing, out of memory): those are hatched and pale,
and the note says why, so they are never read as plain numbers.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from moebench.reportparts import MAX_ASPECT, chunks, si

WIDTH_IN = 11.0
NCOLS = 3
MAX_ROWS = 4
TITLE_IN = 0.75      # suptitle and margins
PANEL_PAD_IN = 0.75  # panel title and x axis


@dataclass
class Bar:
    label: str
    value: float
    color: str
    lo: float | None = None
    hi: float | None = None
    note: str = ""
    base: bool = False
    flagged: str = ""   # "" or why the bar is not a plain number ("noisy", "oom")


@dataclass
class Panel:
    title: str
    bars: list[Bar]
    lines: list[tuple[float, str]] = field(default_factory=list)   # vertical reference lines: (x, label)


def _panel_height(n_bars: int) -> float:
    return 0.35 + 0.3 * max(n_bars, 1)


def layout(panels: list[Panel]) -> list[list[Panel]]:
    """Panels split into figures: NCOLS across, as many rows as fit MAX_ROWS and MAX_ASPECT."""
    if not panels:
        return []
    tallest = max(_panel_height(len(p.bars)) for p in panels)
    fit = int((MAX_ASPECT * 0.95 * WIDTH_IN - TITLE_IN) // (tallest + PANEL_PAD_IN))
    rows = max(1, min(MAX_ROWS, fit))
    per = rows * NCOLS
    return chunks(panels, per)


def figure(panels: list[Panel], xlabel: str, suptitle: str) -> Figure:
    """One figure of up to NCOLS x MAX_ROWS panels, its size fixed (no tight bounding box) so that its aspect is
    what layout() planned."""
    rows = math.ceil(len(panels) / NCOLS)
    tallest = max(_panel_height(len(p.bars)) for p in panels)
    height = min(TITLE_IN + rows * (tallest + PANEL_PAD_IN), MAX_ASPECT * 0.95 * WIDTH_IN)
    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    fig.suptitle(suptitle, fontsize=10, x=0.01, ha="left")
    axes = fig.subplots(rows, NCOLS, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            draw(ax, panels[i], xlabel)
        else:
            ax.set_visible(False)
    return fig


def draw(ax, p: Panel, xlabel: str) -> None:
    n = len(p.bars)
    ys = list(range(n))
    top = max([b.hi if b.hi is not None else b.value for b in p.bars] + [x for x, _ in p.lines] + [0.0])
    for y, b in zip(ys, p.bars):
        err = None
        if b.lo is not None and b.hi is not None:
            err = [[max(0.0, b.value - b.lo)], [max(0.0, b.hi - b.value)]]
        ax.barh([y], [b.value], height=0.7, color=b.color, alpha=0.45 if b.flagged else 1.0,
                hatch="///" if b.flagged else None, edgecolor="black" if b.base else (b.color if not b.flagged
                                                                                     else "#555555"),
                linewidth=1.6 if b.base else 0.6, xerr=err, error_kw={"elinewidth": 0.9, "capsize": 2.5})
        end = b.hi if b.hi is not None else b.value
        note = "  ".join(s for s in (b.note, b.flagged) if s)
        if note:
            ax.text(end + top * 0.02, y, note, va="center", fontsize=7.5,
                    color="#B00020" if b.flagged else "black", fontweight="bold" if b.base else "normal")
    for x, label in p.lines:
        ax.axvline(x, color="black", linestyle="--", linewidth=1.0)
        ax.text(x, -0.6, f" {label}", fontsize=6.5, va="bottom", ha="left", color="#333333")
    ax.set_yticks(ys, [(b.label + " (base)" if b.base else b.label) for b in p.bars], fontsize=7.5)
    ax.set_ylim(n - 0.5, -0.5 - (0.5 if p.lines else 0.0))
    ax.set_xlim(0, top * 1.42 if top > 0 else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v) if v else "0"))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=7.5)
    ax.set_title("\n".join(textwrap.shorten(line, 48, placeholder="...") for line in p.title.split("\n")[:2]),
                 fontsize=8, loc="left")
    ax.grid(axis="x", alpha=0.3)
