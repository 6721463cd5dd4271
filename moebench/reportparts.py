"""The pieces a report is made of (plots, tables, sections) and the helpers every report module shares: number
formatting, PNG encoding and the one check every figure must pass (at most MAX_ASPECT times taller than wide,
so that it reads at 100% zoom, never a 4,000-pixel strip)."""
from __future__ import annotations

import base64
import io
import math
import struct
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

MAX_ASPECT = 1.5   # height / width of any figure
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
          "#CCB974", "#64B5CD"]


@dataclass
class Plot:
    name: str       # file stem under plots/ (and the HTML anchor)
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()

    @property
    def size(self) -> tuple[int, int]:
        return png_size(self.png)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    id: str          # HTML id, stable across renders: tests and links find sections by it
    title: str
    text: list[str] = field(default_factory=list)   # paragraphs (notes: what is shown, what is missing and why)
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG (no IHDR chunk after the signature)")
    return struct.unpack(">II", png[16:24])


def png(fig: Figure, *, tight: bool = True) -> bytes:
    """The figure as PNG at 100 dpi; tight=False keeps the figure size exactly (figsize * 100 pixels)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buf.getvalue()


def chunks(items: list, per: int) -> list[list]:
    per = max(1, per)
    return [items[i:i + per] for i in range(0, len(items), per)] or [[]]


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return ""
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def pct(v) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else ""


def si(v: float) -> str:
    """A compact number for axis ticks and bar labels: 950, 12.3k, 1.25M."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def color_map(names: list[str]) -> dict[str, str]:
    return {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}
