"""`moebench compare`: is the new run worse than the base, beyond noise? Exit 0 no regression, 1 regression,
2 bad input. Metrics and the good direction: tokens/s up (it is tokens / step time, so it judges the step time
too), peak memory down, MaxVio down.

    moebench compare results/base.jsonl results/new.jsonl        # two runs, cases matched by case_key
    moebench compare results/run.jsonl --baseline naive          # one run: every backend against one

Two runs differ in time only when the change exceeds --threshold (default 5%) AND the two medians' 95% intervals
do not overlap. Each interval comes from its record's timed blocks (metrics.precision.ci95_ms: it carries that
run's block-to-block variation, not only step-to-step jitter; records without it, older ones and train-runs: from
their step samples, shown but never deciding: such a row is `noise` past the threshold). The step samples inside a run cannot tell two runs apart: a test on them (Mann-Whitney, as
before) called two back-to-back runs of the same code different because runs drift. A record flagged `noisy`
(precision not reached, wide spread, drift, a busy device) gives `noise`, never `regression` (nor `same`), and the
row says what would decide it. A real difference below the threshold is `same`, with a pointer to `moebench paired`, which
times both sides in interleaved rounds and resolves differences two separate runs cannot.
Metrics without samples (peak memory, MaxVio) are single values that do not vary with timing noise for a fixed
seed: they regress when they moved the bad way by more than the threshold and by more than a small absolute floor.
A CPU record's peak is its worker's RSS high-water mark, which is not such a value (it moves between processes by
several percent): it is not judged, and a warning says so.
A case that ran ok in the base but not in the new run is a regression too (two-run mode).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import pandas as pd

from moebench import metrics, results


class Metric(NamedTuple):
    name: str
    label: str
    higher_is_better: bool
    samples: bool     # a timing: judged by its 95% interval (and the records' noise flags)
    floor: float      # an absolute change below this never counts


METRICS = (
    Metric("tokens_per_s", "tokens/s", True, True, 0.0),
    Metric("peak_gib", "peak GiB", False, False, 0.01),
    Metric("maxvio", "MaxVio", False, False, 0.01),
)
ENV_KEYS = ("gpu", "cpu", "driver", "cuda", "torch", "triton")
MIN_SAMPLES = 6  # the fewest step samples that give a 95% interval of their median (older records)
PAIRED_HINT = "for differences this small, time both sides in one window: `moebench paired`"


class BadInput(ValueError):
    """Nothing to compare (the message says why); the CLI exits 2."""


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mode: str = "runs"
    threshold: float = 0.05

    @property
    def regressions(self) -> int:
        return sum(r["verdict"] == "regression" for r in self.rows)

    @property
    def improvements(self) -> int:
        return sum(r["verdict"] == "improvement" for r in self.rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["case", "backend", "against", "metric", "base", "base_ci", "new",
                                                "new_ci", "change", "verdict", "why"])


def interval(r: pd.Series) -> tuple[list[float] | None, str]:
    """The 95% interval of a record's median tokens/s, and where it came from."""
    tokens = r.get("tokens")
    ci = r.get("ci95_ms")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in ci):
        return [tokens / (ci[1] / 1e3), tokens / (ci[0] / 1e3)], "blocks"
    s = r.get("step_ms_samples")
    if isinstance(s, list):
        a = [x for x in s if isinstance(x, (int, float)) and math.isfinite(x) and x > 0]
        if len(a) >= MIN_SAMPLES and (c := metrics.median_ci(a)) is not None:
            return [tokens / (c[1] / 1e3), tokens / (c[0] / 1e3)], "step samples (a record without blocks)"
    return None, "none"


def _noisy(r: pd.Series) -> str | None:
    v = r.get("noisy")
    return v if isinstance(v, str) and v else None


def judge(metric: Metric, base: pd.Series, new: pd.Series, threshold: float) -> dict | None:
    """One row: the relative change, the two intervals where they exist, and the verdict with its reason."""
    b, n = base.get(metric.name), new.get(metric.name)
    if b is None or n is None or pd.isna(b) or pd.isna(n):
        return None
    b, n = float(b), float(n)
    change = (n - b) / abs(b) if b != 0 else (0.0 if n == b else math.copysign(math.inf, n - b))
    worse = change < 0 if metric.higher_is_better else change > 0
    beyond = abs(change) > threshold and abs(n - b) > metric.floor
    row = {"metric": metric.label, "base": b, "new": n, "change": change, "base_ci": None, "new_ci": None}
    if not metric.samples:
        if not beyond:
            return row | {"verdict": "same", "why": f"|change| <= {threshold:.0%}"
                          + (f" or <= {metric.floor:g}" if metric.floor else "")}
        return row | {"verdict": "regression" if worse else "improvement",
                      "why": f"{'worse' if worse else 'better'} by {abs(change):.1%}, single value (deterministic "
                             f"for a seed)"}
    (cb, src_b), (cn, src_n) = interval(base), interval(new)
    row |= {"base_ci": cb, "new_ci": cn}
    overlap = cb is None or cn is None or (cb[0] <= cn[1] and cn[0] <= cb[1])
    noisy = [f"{side}: {why}" for side, why in (("base", _noisy(base)), ("new", _noisy(new))) if why]
    older = "; intervals from step samples (records without blocks)" if "samples" in src_b + src_n else ""
    if noisy:  # a noisy record decides nothing, a small change included
        return row | {"verdict": "noise", "why": "; ".join(noisy) + " -> rerun on a quiet machine with a longer "
                      "--max-time (or --precision reached) to decide"}
    if not beyond:
        why = f"|change| <= {threshold:.0%}" + (f" or <= {metric.floor:g}" if metric.floor else "")
        if not overlap and change != 0:
            why += f"; the intervals do not overlap: a real {abs(change):.1%} difference? {PAIRED_HINT}"
        return row | {"verdict": "same", "why": why + older}
    if cb is None or cn is None:
        return row | {"verdict": "noise", "why": "no 95% interval on a side (too few blocks): rerun with a longer "
                      "--max-time to decide" + older}
    if older:  # within-run step jitter cannot tell two runs apart (the module's docstring): never a verdict
        return row | {"verdict": "noise", "why": f"{'worse' if worse else 'better'} by {abs(change):.1%}, but a side "
                      "has no block interval (a record without blocks, e.g. a train-run): " + PAIRED_HINT}
    if overlap:
        return row | {"verdict": "noise", "why": f"{'worse' if worse else 'better'} by {abs(change):.1%} but the 95% "
                      "intervals overlap: more samples (--max-time) or a tighter --precision would decide" + older}
    return row | {"verdict": "regression" if worse else "improvement",
                  "why": f"{'worse' if worse else 'better'} by {abs(change):.1%}; the 95% intervals do not overlap"
                  + older}


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


RSS_WARNING = ("peak memory not compared for CPU records: their peak is the worker process's RSS high-water mark "
               "(imports, allocator arenas, earlier cases in the worker), which moves between runs")


def _judge_all(cmp: Comparison, head: dict, b: pd.Series, n: pd.Series, threshold: float) -> None:
    """Every metric's row for one pair of records (a CPU peak RSS is left out, with one warning)."""
    for m in METRICS:
        if m.name == "peak_gib" and "rss" in (b.get("peak_kind"), n.get("peak_kind")):
            if RSS_WARNING not in cmp.warnings:
                cmp.warnings.append(RSS_WARNING)
            continue
        if (row := judge(m, b, n, threshold)) is not None:
            cmp.rows.append(head | row)


CPU_WARNING = ("CPU timings: two separate runs on a shared or virtual machine can differ by tens of percent while "
               "each run's own interval is narrow (the machine's load moves between runs, not within one); a "
               "`regression` here may be the machine. Time both sides together to decide: `moebench paired`")


def compare_runs(base: list[dict], new: list[dict], *, threshold: float = 0.05) -> Comparison:
    """Cases matched by case_key: the new run against the base run."""
    from moebench.report import frame

    cmp = Comparison(mode="runs", threshold=threshold, warnings=env_warnings(base, new))
    if any((r.get("env") or {}).get("device") == "cpu" and r.get("status") == "ok" for r in base + new):
        cmp.warnings.append(CPU_WARNING)
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
        head = {"case": _case(n), "backend": n["backend_label"], "against": "base", "case_key": k}
        if b["status"] == "ok" and n["status"] != "ok":
            cmp.rows.append(head | {"metric": "status", "base": "ok", "new": n["status"], "change": None,
                                    "verdict": "regression", "why": str(n["reason"] or n["status"])})
            continue
        if b["status"] != "ok" or n["status"] != "ok":
            cmp.rows.append(head | {"metric": "status", "base": b["status"], "new": n["status"], "change": None,
                                    "verdict": "improvement" if n["status"] == "ok" else "not compared",
                                    "why": str(b["reason"] or b["status"]) + (" -> ok" if n["status"] == "ok" else "")})
            continue
        _judge_all(cmp, head, b, n, threshold)
    return cmp


def compare_baseline(run: list[dict], baseline: str, *, threshold: float = 0.05) -> Comparison:
    """One run: every backend against `baseline` on the same model and workload (the case minus the backend)."""
    from moebench.report import frame

    cmp = Comparison(mode="baseline", threshold=threshold)
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
                                    "verdict": "not compared", "why": f"{who}: {why or 'not ok'}"})
            continue
        _judge_all(cmp, head, b, n, threshold)
    return cmp


# --------------------------------------------------------------------------------------------- output
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def _ci(ci) -> str:
    return f"{_cell(ci[0])}-{_cell(ci[1])}" if ci else ""


def _display(cmp: Comparison) -> list[list[str]]:
    out = []
    for r in cmp.rows:
        ch = r["change"]
        out.append([r["case"], r["backend"], r["metric"], _cell(r["base"]), _ci(r.get("base_ci")), _cell(r["new"]),
                    _ci(r.get("new_ci")), "" if ch is None else (f"{ch:+.1%}" if math.isfinite(ch) else f"{ch:+}"),
                    r["verdict"], r["why"]])
    return out


def columns(cmp: Comparison) -> list[str]:
    runs = cmp.mode == "runs"
    return ["case", "backend", "metric", "base" if runs else "baseline", "base 95% CI" if runs else "baseline 95% CI",
            "new" if runs else "backend value", "new 95% CI" if runs else "backend 95% CI", "change", "verdict", "why"]


VERDICT_COL = 8


def summary(cmp: Comparison) -> str:
    against = "the base run" if cmp.mode == "runs" else f"'{cmp.rows[0]['against']}'" if cmp.rows else "the baseline"
    noise = sum(r["verdict"] == "noise" for r in cmp.rows)
    return (f"{cmp.regressions} regression(s), {cmp.improvements} improvement(s), {noise} undecided (noise) against "
            f"{against} (threshold {cmp.threshold:.0%}; timings also need non-overlapping 95% intervals and records "
            "that are not noisy)")


def visible(cmp: Comparison, only_changes: bool) -> list[int]:
    """Indices of the rows to show: all, or with only_changes every row but `same`."""
    return [i for i, r in enumerate(cmp.rows) if not only_changes or r["verdict"] != "same"]


def rich_table(cmp: Comparison, only_changes: bool = False):
    from rich.markup import escape
    from rich.table import Table

    style = {"regression": "bold red", "improvement": "green", "noise": "yellow", "same": "dim",
             "not compared": "dim"}
    t = Table(title="moebench compare", caption=summary(cmp))
    right = ("base", "new", "baseline", "backend value", "change")
    for c in columns(cmp):
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    rows = _display(cmp)
    for i in visible(cmp, only_changes):
        row = [escape(c) for c in rows[i]]  # reasons and names are text, not markup
        row[VERDICT_COL] = f"[{style.get(cmp.rows[i]['verdict'], 'none')}]{row[VERDICT_COL]}[/]"
        t.add_row(*row)
    return t


def _md_cell(c: str) -> str:
    """A table cell on one line: a `|` or a line break in a reason would break the Markdown table."""
    return " ".join(c.replace("|", "\\|").split())


def markdown(cmp: Comparison, only_changes: bool = False) -> str:
    """A Markdown table, the summary, and the warnings (environments differ, unmatched cases): what a CI job
    appends to $GITHUB_STEP_SUMMARY."""
    cols = columns(cmp)
    rows = _display(cmp)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_md_cell(c) for c in rows[i]) + " |" for i in visible(cmp, only_changes)]
    lines += ["", summary(cmp)]
    if cmp.warnings:
        lines += [""] + [f"- warning: {_md_cell(w)}" for w in cmp.warnings]
    return "\n".join(lines) + "\n"


def as_json(cmp: Comparison, only_changes: bool = False) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return [clean(x) for x in v] if isinstance(v, list) else v
    rows = [{k: clean(v) for k, v in cmp.rows[i].items()} for i in visible(cmp, only_changes)]
    return json.dumps({"mode": cmp.mode, "threshold": cmp.threshold, "regressions": cmp.regressions,
                       "improvements": cmp.improvements, "noise": sum(r["verdict"] == "noise" for r in cmp.rows),
                       "exit_code": 1 if cmp.regressions else 0, "warnings": cmp.warnings, "rows": rows}, indent=1)


def cli(base_path, new_path, baseline: str | None, threshold: float, fmt: str, out, err,
        only_changes: bool = False) -> int:
    """The `moebench compare` command; returns the exit code (0 no regression, 1 regression, 2 bad input).
    `out`/`err` are rich Consoles."""
    from rich.markup import escape

    def fail(msg):
        err.print("[bold red]error:[/] " + escape(msg), highlight=False, soft_wrap=True)
        return 2

    if fmt not in ("table", "md", "csv", "json"):
        return fail(f"--format must be table, md, csv or json, not '{fmt}'")
    if (new_path is None) == (baseline is None):
        return fail("give two results files (base, new) or one results file with --baseline BACKEND")
    if not 0 <= threshold < 10:
        return fail(f"--threshold must be in [0, 10); got {threshold}")
    sides = []
    for p in [base_path] + ([new_path] if new_path is not None else []):
        loaded = results.read(p)
        for problem in loaded.problems:
            err.print("[yellow]warning:[/] " + escape(problem), highlight=False, soft_wrap=True)
        if not loaded.records:
            return fail(f"{p}: no usable records")
        sides.append(loaded.records)
    try:
        cmp = (compare_runs(sides[0], sides[1], threshold=threshold) if baseline is None
               else compare_baseline(sides[0], baseline, threshold=threshold))
    except BadInput as e:
        return fail(str(e))
    for w in cmp.warnings:
        err.print("[yellow]warning:[/] " + escape(w), highlight=False, soft_wrap=True)
    if fmt == "table":
        out.print(rich_table(cmp, only_changes))
    elif fmt == "md":
        out.print(markdown(cmp, only_changes), end="", highlight=False, markup=False, soft_wrap=True)
    elif fmt == "csv":
        f = cmp.frame()
        f = f.iloc[visible(cmp, only_changes)]
        out.print(f.to_csv(index=False), end="", highlight=False, markup=False, soft_wrap=True)
    else:
        out.print(as_json(cmp, only_changes), highlight=False, markup=False, soft_wrap=True)
    if fmt != "table":
        err.print(summary(cmp), highlight=False, markup=False)
    return 1 if cmp.regressions else 0
