"""`moebench compare`: is the new run worse than the base, beyond noise? Exit 0 no regression, 1 regression,
2 bad input. Metrics and the good direction: tokens/s up (it is tokens / step time, so it judges the step time
too), peak memory down, MaxVio down.

    moebench compare results/base.jsonl results/new.jsonl        # two runs, cases matched by case_key
    moebench compare results/run.jsonl --baseline naive          # one run: every backend against one

A timing metric regresses only when it moved the bad way by more than --threshold (default 5%) AND the
step-time samples of the two sides differ (two-sided Mann-Whitney U, p < --alpha, default 0.01): a noisy
machine then cannot cry wolf, and a real slow-down with enough samples cannot hide. Metrics without samples
(peak memory, MaxVio) are single values that do not vary with timing noise for a fixed seed: they regress
when they moved the bad way by more than the threshold and by more than a small absolute floor.
A case that ran ok in the base but not in the new run is a regression too (two-run mode).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd

from moebench import results


class Metric(NamedTuple):
    name: str
    label: str
    higher_is_better: bool
    samples: bool     # judged with Mann-Whitney U on the step-time samples
    floor: float      # an absolute change below this never counts


METRICS = (
    Metric("tokens_per_s", "tokens/s", True, True, 0.0),
    Metric("peak_gib", "peak GiB", False, False, 0.01),
    Metric("maxvio", "MaxVio", False, False, 0.01),
)
ENV_KEYS = ("gpu", "cpu", "driver", "cuda", "torch", "triton")
MIN_SAMPLES = 3


class BadInput(ValueError):
    """Nothing to compare (the message says why); the CLI exits 2."""


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mode: str = "runs"
    threshold: float = 0.05
    alpha: float = 0.01

    @property
    def regressions(self) -> int:
        return sum(r["verdict"] == "regression" for r in self.rows)

    @property
    def improvements(self) -> int:
        return sum(r["verdict"] == "improvement" for r in self.rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["case", "backend", "against", "metric", "base", "new", "change", "p",
                                                "verdict", "why"])


def _samples(r: pd.Series) -> np.ndarray | None:
    s = r.get("step_ms_samples")
    if not isinstance(s, list):
        return None
    a = np.asarray([x for x in s if isinstance(x, (int, float)) and math.isfinite(x)], dtype=float)
    return a if a.size >= MIN_SAMPLES else None


def judge(metric: Metric, base: pd.Series, new: pd.Series, threshold: float, alpha: float) -> dict | None:
    """One row: the relative change, the p-value where samples exist, and the verdict with its reason."""
    from scipy.stats import mannwhitneyu

    b, n = base.get(metric.name), new.get(metric.name)
    if b is None or n is None or pd.isna(b) or pd.isna(n):
        return None
    b, n = float(b), float(n)
    change = (n - b) / abs(b) if b != 0 else (0.0 if n == b else math.copysign(math.inf, n - b))
    worse = change < 0 if metric.higher_is_better else change > 0
    beyond = abs(change) > threshold and abs(n - b) > metric.floor
    p = None
    if metric.samples:
        sb, sn = _samples(base), _samples(new)
        if sb is not None and sn is not None:
            p = float(mannwhitneyu(sb, sn, alternative="two-sided").pvalue)
    if not beyond:
        verdict, why = "same", f"|change| <= {threshold:.0%}" + (f" or <= {metric.floor:g}" if metric.floor else "")
    elif metric.samples and p is None:
        verdict, why = "noise", f"fewer than {MIN_SAMPLES} step-time samples on a side: cannot test"
    elif metric.samples and p >= alpha:
        verdict, why = "noise", f"samples do not differ (Mann-Whitney p = {p:.2g} >= {alpha:g})"
    else:
        verdict = "regression" if worse else "improvement"
        why = (f"{'worse' if worse else 'better'} by {abs(change):.1%}"
               + (f", Mann-Whitney p = {p:.2g}" if p is not None else ", single value (deterministic for a seed)"))
    return {"metric": metric.label, "base": b, "new": n, "change": change, "p": p, "verdict": verdict, "why": why}


def _case(r: pd.Series) -> str:
    return f"{r['model']} · {r['workload']}"


def _last(df: pd.DataFrame, key: str, side: str, warnings: list[str]) -> pd.DataFrame:
    dup = df[key].duplicated(keep="last")
    if dup.any():
        warnings.append(f"{side}: {int(dup.sum())} case(s) recorded more than once; the last record of each is used")
    return df[~dup]


def env_warnings(base: list[dict], new: list[dict]) -> list[str]:
    """A warning per env key whose values differ between the two sides (timings may not be comparable)."""
    out = []
    for k in ENV_KEYS:
        vb = sorted({str((r.get("env") or {}).get(k)) for r in base})
        vn = sorted({str((r.get("env") or {}).get(k)) for r in new})
        if vb != vn:
            out.append(f"environments differ: {k} {', '.join(vb)} (base) vs {', '.join(vn)} (new)")
    return out


def compare_runs(base: list[dict], new: list[dict], *, threshold: float = 0.05, alpha: float = 0.01) -> Comparison:
    """Cases matched by case_key: the new run against the base run."""
    from moebench.report import frame

    cmp = Comparison(mode="runs", threshold=threshold, alpha=alpha, warnings=env_warnings(base, new))
    fb = _last(frame(base), "case_key", "base", cmp.warnings).set_index("case_key")
    fn = _last(frame(new), "case_key", "new", cmp.warnings).set_index("case_key")
    common = [k for k in fb.index if k in fn.index]
    if not common:
        raise BadInput(f"no case in common: the base has {len(fb)} case(s), the new run {len(fn)}, "
                       "and no case_key matches (different suites, or specs changed between versions?)")
    only_b, only_n = len(fb) - len(common), len(fn) - len(common)
    if only_b or only_n:
        cmp.warnings.append(f"{only_b} case(s) only in the base and {only_n} only in the new run are not compared")
    for k in common:
        b, n = fb.loc[k], fn.loc[k]
        head = {"case": _case(n), "backend": n["backend_label"], "against": "base"}
        if b["status"] == "ok" and n["status"] != "ok":
            cmp.rows.append(head | {"metric": "status", "base": "ok", "new": n["status"], "change": None, "p": None,
                                    "verdict": "regression", "why": str(n["reason"] or n["status"])})
            continue
        if b["status"] != "ok" or n["status"] != "ok":
            cmp.rows.append(head | {"metric": "status", "base": b["status"], "new": n["status"], "change": None,
                                    "p": None, "verdict": "improvement" if n["status"] == "ok" else "not compared",
                                    "why": str(b["reason"] or b["status"]) + (" -> ok" if n["status"] == "ok" else "")})
            continue
        for m in METRICS:
            if (row := judge(m, b, n, threshold, alpha)) is not None:
                cmp.rows.append(head | row)
    return cmp


def compare_baseline(run: list[dict], baseline: str, *, threshold: float = 0.05, alpha: float = 0.01) -> Comparison:
    """One run: every backend against `baseline` on the same model and workload (the case minus the backend)."""
    from moebench.report import frame

    cmp = Comparison(mode="baseline", threshold=threshold, alpha=alpha)
    df = frame(run)
    df["ident"] = df["group_key"] + "|" + df["backend_label"]
    df = _last(df, "ident", "run", cmp.warnings)
    present = sorted(df["backend_label"].unique())
    if baseline not in present:
        raise BadInput(f"baseline backend '{baseline}' is not in the run; backends present: {', '.join(present)}")
    ref = df[df["backend_label"] == baseline].set_index("group_key")
    others = df[(df["backend_label"] != baseline) & df["group_key"].isin(ref.index)]
    if others.empty:
        raise BadInput(f"no other backend ran the same model and workload as '{baseline}'")
    for _, n in others.iterrows():
        b = ref.loc[n["group_key"]]
        head = {"case": _case(n), "backend": n["backend_label"], "against": baseline}
        if b["status"] != "ok" or n["status"] != "ok":
            who = baseline if b["status"] != "ok" else n["backend_label"]
            why = b["reason"] if b["status"] != "ok" else n["reason"]
            cmp.rows.append(head | {"metric": "status", "base": b["status"], "new": n["status"], "change": None,
                                    "p": None, "verdict": "not compared", "why": f"{who}: {why or 'not ok'}"})
            continue
        for m in METRICS:
            if (row := judge(m, b, n, threshold, alpha)) is not None:
                cmp.rows.append(head | row)
    return cmp


# --------------------------------------------------------------------------------------------- output
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def _display(cmp: Comparison) -> list[list[str]]:
    out = []
    for r in cmp.rows:
        ch = r["change"]
        out.append([r["case"], r["backend"], r["metric"], _cell(r["base"]), _cell(r["new"]),
                    "" if ch is None else (f"{ch:+.1%}" if math.isfinite(ch) else f"{ch:+}"),
                    "" if r["p"] is None else f"{r['p']:.2g}", r["verdict"], r["why"]])
    return out


def columns(cmp: Comparison) -> list[str]:
    return ["case", "backend", "metric", "base" if cmp.mode == "runs" else "baseline",
            "new" if cmp.mode == "runs" else "backend value", "change", "p", "verdict", "why"]


def summary(cmp: Comparison) -> str:
    against = "the base run" if cmp.mode == "runs" else f"'{cmp.rows[0]['against']}'" if cmp.rows else "the baseline"
    return (f"{cmp.regressions} regression(s), {cmp.improvements} improvement(s) against {against} "
            f"(threshold {cmp.threshold:.0%}; timings also need Mann-Whitney p < {cmp.alpha:g})")


def rich_table(cmp: Comparison):
    from rich.markup import escape
    from rich.table import Table

    style = {"regression": "bold red", "improvement": "green", "noise": "yellow", "same": "dim",
             "not compared": "dim"}
    t = Table(title="moebench compare", caption=summary(cmp))
    for c in columns(cmp):
        t.add_column(c, justify="right" if c in ("base", "new", "baseline", "backend value", "change", "p") else "left",
                     overflow="fold")
    for row, r in zip(_display(cmp), cmp.rows):
        row = [escape(c) for c in row]  # reasons and names are text, not markup
        row[7] = f"[{style.get(r['verdict'], 'none')}]{row[7]}[/]"
        t.add_row(*row)
    return t


def markdown(cmp: Comparison) -> str:
    cols = columns(cmp)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _display(cmp)]
    return "\n".join(lines + ["", summary(cmp)]) + "\n"


def as_json(cmp: Comparison) -> str:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    rows = [{k: clean(v) for k, v in r.items()} for r in cmp.rows]
    return json.dumps({"mode": cmp.mode, "threshold": cmp.threshold, "alpha": cmp.alpha,
                       "regressions": cmp.regressions, "improvements": cmp.improvements,
                       "warnings": cmp.warnings, "rows": rows}, indent=1)


def cli(base_path, new_path, baseline: str | None, threshold: float, alpha: float, fmt: str, out, err) -> int:
    """The `moebench compare` command; returns the exit code. `out`/`err` are rich Consoles."""
    from rich.markup import escape

    def fail(msg):
        err.print("[bold red]error:[/] " + escape(msg), highlight=False, soft_wrap=True)
        return 2

    if fmt not in ("table", "md", "csv", "json"):
        return fail(f"--format must be table, md, csv or json, not '{fmt}'")
    if (new_path is None) == (baseline is None):
        return fail("give two results files (base, new) or one results file with --baseline BACKEND")
    if not 0 <= threshold < 10 or not 0 < alpha < 1:
        return fail(f"--threshold must be in [0, 10) and --alpha in (0, 1); got {threshold}, {alpha}")
    sides = []
    for p in [base_path] + ([new_path] if new_path is not None else []):
        loaded = results.read(p)
        for problem in loaded.problems:
            err.print("[yellow]warning:[/] " + escape(problem), highlight=False, soft_wrap=True)
        if not loaded.records:
            return fail(f"{p}: no usable records")
        sides.append(loaded.records)
    try:
        cmp = (compare_runs(sides[0], sides[1], threshold=threshold, alpha=alpha) if baseline is None
               else compare_baseline(sides[0], baseline, threshold=threshold, alpha=alpha))
    except BadInput as e:
        return fail(str(e))
    for w in cmp.warnings:
        err.print("[yellow]warning:[/] " + escape(w), highlight=False, soft_wrap=True)
    if fmt == "table":
        out.print(rich_table(cmp))
    elif fmt == "md":
        out.print(markdown(cmp), end="", highlight=False, markup=False, soft_wrap=True)
    elif fmt == "csv":
        out.print(cmp.frame().to_csv(index=False), end="", highlight=False, markup=False, soft_wrap=True)
    else:
        out.print(as_json(cmp), highlight=False, markup=False, soft_wrap=True)
    if fmt != "table":
        err.print(summary(cmp), highlight=False, markup=False)
    return 1 if cmp.regressions else 0
