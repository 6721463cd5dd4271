"""`moebench report`: results JSONL -> report.md, a self-contained index.html and PNG plots.

    moebench report results/a.jsonl results/b.jsonl -o reports/mine

The report is a list of sections, each drawn only when its data exists (never an empty figure; a section whose
data is missing says why instead):
  throughput / memory   small multiples: one panel per model and workload, a bar per backend with its interval
                        (the record's 95% CI of the median; older records: p20-p80), the base (naive, else
                        grouped_mm) outlined, each bar's speed-up (memory: ratio) printed on it; grouped by
                        level, mode and execution mode, several figures rather than one long strip
  gemm                  the expert-GEMM dtype axis: fp8 cases against bf16 grouped_mm (speed-up, error vs the fp8
                        reference and vs naive) and the bf16-vs-fp8 train-run loss gap (moebench/report_fp8.py);
                        drawn only when a record has a non-default gemm dtype, which is also in the backend's label
  exec                  eager vs CUDA graphs vs torch.compile side by side, and noisy records per mode
  ep                    multi-rank records against the best one-GPU record of their file (moebench/report_ep.py)
  roofline              layer cases against the ceilings measured in the same run (moebench/roofline.py)
  phases                each profiled case's step split into phases (moebench/phases.py), or a note
  balance, training,    MaxVio/CV per router, per-expert load heatmaps, loss and MaxVio curves, scaling
  scaling               sweeps (moebench/report_curves.py)
  paired                `moebench paired` results given with -p
  claims                the seeds' claims, claimed vs measured, per execution mode (moebench/claims.py)
  tables                every ok case (noisy ones marked, with the reason; MFU from each record's own env
                        ceiling), training runs, every non-ok case with its reason, the env block of each run
and every problem found while reading the inputs (file:line). Every figure is at most 1.5x taller than wide.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moebench import metrics, results, roofline
from moebench.report_curves import find_sweeps, plot_balance, plot_heatmaps, plot_scaling, plot_training
from moebench.report_ep import ep_section
from moebench.report_fp8 import gemm_section
from moebench.report_perf import exec_section, memory_section, throughput_section
from moebench.report_phases import phases_section
from moebench.report_roofline import roofline_section
from moebench.reportparts import Plot, Section, Table, color_map, pct
from moebench.reportparts import fmt as _fmt

TEMPLATES = Path(__file__).resolve().parent / "templates"
REFERENCE = "naive"
__all__ = ["NoUsableRecords", "Plot", "Report", "Section", "Table", "build", "find_sweeps", "frame", "latest",
           "render", "write"]


class NoUsableRecords(ValueError):
    """Nothing in the inputs could be used (the message lists the problems)."""


@dataclass
class Report:
    inputs: list[str]
    counts: dict
    sections: list[Section] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def plots(self) -> list[Plot]:
        return [p for s in self.sections for p in s.plots]

    @property
    def tables(self) -> list[Table]:
        return [t for s in self.sections for t in s.tables]


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


def _first(d: dict, *paths: str):
    """The first present value among dotted paths in a nested dict."""
    for p in paths:
        cur = d
        for k in p.split("."):
            cur = cur.get(k) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def _interval(r: dict, tokens: int) -> tuple[float | None, float | None, str]:
    """The tokens/s interval of a record: its 95% CI of the median (from metrics.precision.ci95_ms, step ms), or
    for older records p20-p80 of the timed steps."""
    m = r.get("metrics") or {}
    ci = (m.get("precision") or {}).get("ci95_ms")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in ci) and tokens:
        return tokens / (ci[1] / 1e3), tokens / (ci[0] / 1e3), "95% CI"
    tps = m.get("tokens_per_s") or {}
    if tps.get("p20") is not None and tps.get("p80") is not None:
        return tps["p20"], tps["p80"], "p20-p80"
    return None, None, ""


def frame(records: list[dict]) -> pd.DataFrame:
    """results.to_frame plus the columns the report needs (labels, interval, ceilings, efficiency, roofline
    model, budget, router, curves, loads, profile)."""
    df = results.to_frame(records)
    if df.empty:
        return df
    extra = []
    for r, tokens in zip(records, df["tokens"]):
        c, m, env = r.get("case") or {}, r.get("metrics") or {}, r.get("env") or {}
        w, mod = c.get("workload") or {}, c.get("model") or {}
        mem = m.get("memory") or {}
        opts = c.get("backend_options") or {}
        # a multi-rank record's tokens/s and TFLOP/s count every rank (core.timing_metrics): so do its interval
        # (results.to_frame's tokens) and the ceilings its MFU is taken against; its ranks are part of the workload
        R = int(w.get("ranks") or 1)
        fpt = m.get("flops_per_token")
        ex = w.get("exec", "eager")
        base = f"{w.get('level')}/{w.get('mode')} {w.get('dtype')} {w.get('batch')}x{w.get('seq')} {w.get('routing')}" \
            + (f" {R} rank{'s' if R > 1 else ''}" if w.get("ranks") else "")
        lo, hi, kind = _interval(r, tokens)
        # the stored ceilings are bf16 matmul rates: an fp8 GEMM case gets no MFU and no roofline against them
        bf16_roof = w.get("gemm_dtype", "default") == "default"
        ceiling = env.get("ceiling_tflops") * R if env.get("ceiling_tflops") and bf16_roof else None
        sheet = metrics.datasheet_peak(env.get("gpu")) if bf16_roof else None
        sheet = sheet * R if sheet else None
        tf = m.get("tflops") if r.get("status") == "ok" else None
        extra.append({
            "backend_label": (c.get("backend") or "?") + "".join(f",{k}={v}" for k, v in sorted(opts.items()))
            + (f" [{m['weight_layout']} weights]" if m.get("weight_layout", "canonical") != "canonical" else "")
            + (f" [{w['gemm_dtype']}]" if w.get("gemm_dtype", "default") != "default" else ""),
            "workload_base": base,
            "workload": f"{base} {ex}",  # every verdict says its execution mode, eager included
            # the gemm dtype is in the backend's label, not the group: fp8 cases sit beside their bf16 base
            "group_key": json.dumps({"model": mod, "workload": {k: v for k, v in w.items() if k != "gemm_dtype"}},
                                    sort_keys=True),
            "parity": m.get("parity") if isinstance(m.get("parity"), dict) else None,
            "router": router_label(mod.get("router") or {}),
            "memory_budget_gib": c.get("memory_budget_gib"),
            "memory_kind": "GPU peak allocated" if "peak_allocated_gib" in mem
            else ("CPU peak RSS" if "peak_rss_gib" in mem else None),
            "ceiling_tflops": env.get("ceiling_tflops"), "ceiling_what": env.get("ceiling"),
            "copy_gbps": env.get("copy_gbps"),
            "datasheet_tflops": sheet,
            # MFU from the ceiling each record stores, never metrics.mfu_measured (issue 17.1: older records
            # computed that against a different ceiling than the one in their env block)
            "mfu_env": tf / ceiling if isinstance(tf, (int, float)) and ceiling else None,
            "mfu_sheet": tf / sheet if isinstance(tf, (int, float)) and sheet else None,
            "tps_lo": lo, "tps_hi": hi, "interval": kind,
            "roofline": roofline.of_case(c) if bf16_roof else None,
            "profile": m.get("profile") if isinstance(m.get("profile"), dict) else None,
            "work_gflop": fpt * tokens / 1e9 if isinstance(fpt, (int, float)) and tokens else None,
            "counts_global": _first(m, "balance.counts_global"),
            "loss_curve": m.get("loss_curve"),
            "val_curve": m.get("val_curve"),             # train-run: [{step, val_loss, maxvio_global}]
            "maxvio_curve": _first(m, "maxvio_batch", "maxvio_curve"),  # per-step MaxVio (mean over layers)
            "train_run": m.get("train_run"),
        })
    out = pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)
    out["noisy"] = out["noisy"].map(lambda v: v if isinstance(v, str) and v else "")
    return out


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
    df["color"] = df["backend_label"].map(color_map(backends))  # one colour per backend in every plot
    return df


# --------------------------------------------------------------------------------------------- tables
def _tps_cell(r) -> str:
    s = _fmt(r["tokens_per_s"])
    if pd.notna(r["tps_lo"]):
        s += f" ({_fmt(r['tps_lo'])}-{_fmt(r['tps_hi'])})"
    return s + (" noisy" if r["noisy"] else "")


def results_table(df: pd.DataFrame) -> Table | None:
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    many = ok["gpu"].nunique(dropna=False) > 1
    rows = []
    for _, r in ok.iterrows():
        rows.append([str(r["model"]), r["workload"], r["backend_label"], _tps_cell(r), r["interval"],
                     _fmt(r["step_ms"]), f"{r['spread']:.0%}" if pd.notna(r["spread"]) else "", _fmt(r["tflops"]),
                     pct(r["mfu_env"]), pct(r["mfu_sheet"]), _fmt(r["peak_gib"]), _fmt(r["maxvio"]),
                     ("noisy: " + r["noisy"]) if r["noisy"] else ""] + ([str(r["gpu"])] if many else []))
    machine = "" if many else f" Machine: {ok['gpu'].iloc[0]}."
    return Table("Results (ok cases)", ["model", "workload", "backend", "tokens/s (interval)", "interval", "step ms",
                                        "spread", "TFLOP/s", "% of measured ceiling (MFU)", "% of datasheet",
                                        "peak GiB", "MaxVio", "noisy"] + (["machine"] if many else []), rows,
                 "tokens/s: median (interval: the record's 95% CI of the median, or p20-p80 of the timed steps for "
                 "records without one); spread = (p80 - p20) / p50 of the step time; TFLOP/s: the counted FLOPs "
                 "(spec.flops_per_token) / the median step time. MFU = TFLOP/s / env.ceiling_tflops of the same "
                 "record (the dense bf16 matmul rate measured in that run), not the record's metrics.mfu_measured: "
                 "older records computed that against a different ceiling than the one they store (issue 17.1). "
                 "% of datasheet: against moebench.metrics.datasheet_peak of the record's GPU. A noisy record's "
                 "reason is in the last column: its numbers are rough." + machine)


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
              ("moebench", "moebench"), ("ceiling_tflops", "ceiling TFLOP/s"), ("ceiling", "ceiling measured"),
              ("copy_gbps", "copy GB/s"), ("copy", "copy measured"))


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


CLAIM_COLUMNS = ("seed", "claim", "compared", "claimed", "unit", "claimed_device", "exec", "measured",
                 "measured_device", "precision", "verdict", "why")


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
    cols = [c for c in CLAIM_COLUMNS if c in cf.columns]
    return Table("Seed claims: claimed vs measured", cols, [[_fmt(r[c]) for c in cols] for _, r in cf.iterrows()],
                 "Each seed system's headline claims, with the device each number was claimed and measured on, the "
                 "execution mode the measurement holds for (a claim measured in several modes has a row per mode) "
                 "and the precision of the timings behind it (95% CI of the median; noisy records say so).")


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


def sections(df: pd.DataFrame, cur: pd.DataFrame, records: list[dict], paired) -> tuple[list[Section], list[str]]:
    """The report's sections in reading order, and the paired sources (added to the inputs)."""
    out = [s for s in (throughput_section(cur), memory_section(cur)) if s is not None]
    if (s := gemm_section(cur)) is not None:
        out.append(s)
    if (cur["status"] == "ok").any():
        out.append(exec_section(cur))
    if (s := ep_section(records)) is not None:
        out.append(s)
    if (s := roofline_section(cur)) is not None:
        out.append(s)
    if (cur["status"] == "ok").any():
        out.append(phases_section(cur))
    bal = plot_balance(cur) + plot_heatmaps(cur)
    if bal:
        out.append(Section("balance", "Expert balance", plots=bal))
    if tr := plot_training(cur):
        out.append(Section("training", "Training curves", plots=tr))
    if sc := plot_scaling(cur):
        out.append(Section("scaling", "Scaling", plots=sc))
    sources = []
    if paired:
        sec = Section("paired", "Paired runs", [("Backends timed in interleaved rounds (`moebench paired`): each "
                                                "speed-up comes from one window of clocks and power state.")])
        for source, result in paired:
            plot, table = paired_parts(source, result)
            sec.plots += [plot] if plot else []
            sec.tables.append(table)
            sources.append(source)
        out.append(sec)
    if (t := claims_table(df)) is not None:
        out.append(Section("claims", "Seed claims", tables=[t]))
    tables = [t for t in (results_table(cur), train_table(cur), status_table(df), env_table(records)) if t is not None]
    out.append(Section("tables", "Full tables", [("Every case as recorded; a resumed or repeated case appears once "
                                                 "(its last record).")], tables=tables))
    return out, sources


def build(loaded: results.Loaded, inputs: list[str], paired: list[tuple[str, dict]] = ()) -> Report:
    """All sections of a report, in memory; `paired`: (source, result) of `moebench paired` runs."""
    if not loaded.records:
        raise NoUsableRecords("no usable records in " + ", ".join(inputs)
                              + "".join(f"\n  {p}" for p in loaded.problems))
    df = frame(loaded.records)
    counts = df["status"].value_counts().to_dict()
    cur = _groups(latest(df))
    rep = Report(inputs=inputs, counts={s: int(counts.get(s, 0)) for s in results.STATUSES if counts.get(s)},
                 problems=list(loaded.problems))
    rep.sections, sources = sections(df, cur, loaded.records, paired)
    rep.inputs = rep.inputs + sources
    return rep


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    e = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, autoescape=False,
                    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    e.filters["md"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    e.filters["h"] = lambda s: html.escape(str(s))
    e.filters["noisy_row"] = lambda row: any(isinstance(v, str) and "noisy" in v for v in row)
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
