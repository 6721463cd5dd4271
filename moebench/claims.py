"""The five seeds' headline claims as data, and claims_frame(df): each claim beside what moebench measured.

A Claim is what a seed README says: the number (or a bound, or None for a feature with no number), its unit,
what was compared and the device it was claimed on, plus how moebench measures it (`kind` and `args`).
claims_frame(df) takes moebench.results.to_frame(records) (or moebench.report.frame(records), which adds the
`router` column the balance claim needs) and returns one row per claim and execution mode:
    seed, claim, compared, claimed, unit, claimed_device, exec, measured, measured_device, precision, verdict, why

Execution modes: a claim whose records ran in several modes (eager, compile, graphs: workload.exec) gets one row
per mode, each judged on that mode's records only (eager PyTorch and CUDA graphs time different things at small
batches, so a verdict holds for the mode it names). `precision` says how well the timings behind a row are
pinned down: each record's 95% interval of the median (relative half-width), and `noisy` where the record is
flagged (its reason, shortened, ends the row's `why`); memory, balance and parameter counts are single values.

Verdicts (the rule applied is restated in each row's `why`):
  parameters   device-free; counted from the preset with ModelSpec.params(); reproduced within 3%.
  tokens/s     absolute throughput: compared only on the claimed GPU model and GPU count (an L4 or 8xA100
               claim against a one-H100 run is `not comparable`); reproduced within 10%.
  peak memory  allocated bytes of the same workload do not depend on the GPU model: compared when the claim's
               workload (batch, seq) is published; reproduced within 10%. GB = 1e9 bytes, as the seeds print.
  ratios       speed-up, memory saving, balance improvement: compared across devices, both named; reproduced
               when at least as good as claimed, with 10% slack.
  features     no number claimed: `not comparable`; the row says how moebench expresses or measures it.
A claim with no usable record is `not comparable`, its why "not measured: ..." naming the reason or the suite.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pandas as pd

from moebench import metrics
from moebench.spec import PRESETS, RouterSpec

PARAMS_TOL = 0.03
REL_TOL = 0.10
COLUMNS = ["seed", "claim", "compared", "claimed", "unit", "claimed_device", "exec", "measured", "measured_device",
           "precision", "verdict", "why"]
EXEC_ORDER = ("eager", "compile", "graphs", "compile-graphs")
REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"


@dataclass(frozen=True)
class Claim:
    seed: str
    claim: str                       # the README's words, short
    compared: str                    # what the number compares, and moebench's counterpart
    claimed: float | str | None      # the number; a string for a bound or a range; None: no number
    unit: str
    claimed_device: str
    kind: str                        # a key of EVALUATORS
    args: dict = field(default_factory=dict)
    note: str = ""                   # a known reason for a gap, shown in `why` when not reproduced


L4 = "NVIDIA L4 (24 GB), 1 GPU, bf16"
A100x8 = "8x A100, seq 2048"
PLOTS = "unspecified (README plots)"
MF_STACK = "MoEForge's own stack (shuffle + flash attention + LigerRMSNorm), batch 8 x seq 512, AdamW"
MF_SMALL_NOTE = ("MoEForge's SMALL_CONFIG (D 512, 6 layers, 4 experts, F 1024, shared F 512, tied V 32000) "
                 "counts 65.2M / 46.3M by its own count_parameters too; the README's 77M / 58M differ "
                 "from it by the same ~11.8M in total and active, so not in the experts; no published "
                 "config gives them")
MF_MEDIUM_MEM_NOTE = ("bf16 weights, gradients and the two AdamW states of 644M parameters alone take "
                      "8 bytes each: 5.2 GB")
OPT_NOTE = ("no expert size reproduces both numbers: with the README's D 512, 8 layers, GQA 8/2 heads, "
            "8 experts, top-2 and V 50257, the tied embedding alone (25.7M) exceeds the 13M active claim, "
            "and without embeddings the 34M of inactive experts force F ~ 461, which gives 16.6M active, "
            "50.6M total (tests/test_spec.py)")
SW_BASE_NOTE = ("its code (one Linear(D, D) per expert, untied output head) gives 89.7M at the quick-start "
                "config (preset: 89.1M, no position embeddings or biases); 65M would need the head tied, "
                "which it is not")
SW_LARGE_NOTE = "the README's only 16-expert config (D 1024, depth 24, V 80000) gives 670M by its code"
NO_XL = "the README publishes no XL configuration (only 32 experts)"


def _mf(size: str, params: tuple, tps: float, gb: float, notes: tuple = ("", "")) -> list[Claim]:
    """MoEForge's L4 table row for Small or Medium: total, active, TPS, memory."""
    name, cfg = f"moeforge-{size.lower()}", f"the {size} config"
    stack = f"{name}+moeforge-stack"
    total, active, share = params
    return [
        Claim("MoEForge", f"{size}: {total}M params total", f"total parameters of {cfg}", float(total),
              "M params", L4, "params", {"preset": name, "which": "total"}, notes[0]),
        Claim("MoEForge", f"{size}: {active}M params active ({share})", f"active parameters of {cfg}",
              float(active), "M params", L4, "params", {"preset": name, "which": "active"}, notes[0]),
        Claim("MoEForge", f"{size}: {tps:,.0f} TPS", f"training tokens/s, {MF_STACK}", tps, "tokens/s", L4,
              "tokens_per_s", {"model": stack, "suite": "seeds"}),
        Claim("MoEForge", f"{size}: {gb} GB memory", f"peak allocated memory, {MF_STACK}", gb, "GB", L4,
              "peak_memory", {"model": stack, "suite": "seeds", "workload_known": True}, notes[1]),
    ]


def _switch(row: str, experts: int, params: float, tps: float, gb: float, preset: str | None,
            note: str) -> list[Claim]:
    """SparseMoE's table row: params, tokens/s, memory, all on 8xA100 at seq 2048 (batch not published)."""
    model = preset
    return [
        Claim("SparseMoE", f"{row} ({experts} experts): {params:g}M params", "total parameters", params,
              "M params", A100x8, "params", {"preset": preset, "which": "total"}, note),
        Claim("SparseMoE", f"{row}: {tps:,.0f} tokens/s", "training tokens/s", tps, "tokens/s", A100x8,
              "tokens_per_s", {"model": model, "suite": "seeds", "gpus": 8}, "" if preset else NO_XL),
        Claim("SparseMoE", f"{row}: {gb} GB memory", "memory usage", gb, "GB", A100x8, "peak_memory",
              {"model": model, "suite": "seeds", "workload_known": False}, "" if preset else NO_XL),
    ]


_STACKS = {"num": "moeforge-medium+opt-", "den": "moeforge-medium+naive-stack", "suite": "l4"}

CLAIMS: list[Claim] = [
    # ---- MoEForge: its L4 table, and the full-stack claim
    *_mf("Small", (77, 58, "75%"), 52805.0, 3.0, notes=(MF_SMALL_NOTE, "")),
    *_mf("Medium", (644, 248, "38%"), 20534.0, 3.2, notes=("", MF_MEDIUM_MEM_NOTE)),
    Claim("MoEForge", "66% faster than naive (LigerRMSNorm + Flash Attention)",
          "tokens/s of the optimised stack / the naive stack (naive MoE + math attention + torch RMSNorm), "
          "Medium, l4 suite", 1.66, "x", L4, "speedup", _STACKS),
    Claim("MoEForge", "47% less memory (LigerRMSNorm + Flash Attention)",
          "peak memory of the optimised stack / the naive stack, Medium, l4 suite", 0.53, "x", L4,
          "memory_ratio", _STACKS),
    # ---- Optimal MoE LM
    Claim("Optimal MoE LM", "~47M total parameters", "total parameters, README default model", 47.0,
          "M params", "none (a parameter count)", "params", {"preset": "optimal-moe-lm", "which": "total"},
          OPT_NOTE),
    Claim("Optimal MoE LM", "~13M active parameters (27%)", "active parameters, README default model", 13.0,
          "M params", "none (a parameter count)", "params", {"preset": "optimal-moe-lm", "which": "active"},
          OPT_NOTE),
    Claim("Optimal MoE LM", "8-13x better balance than traditional methods",
          "global MaxVio with the Switch aux loss / with loss-free bias balancing, same model and training "
          "run (balance suite)", "8-13", "x", "unspecified", "balance_ratio",
          {"low": 8.0, "suite": "balance", "prefer": "optimal-moe-lm"}),
    # ---- SparseMoE (Switch) table
    *_switch("Base", 8, 65.0, 2100.0, 4.2, "switch-base", SW_BASE_NOTE),
    *_switch("Large", 16, 210.0, 850.0, 12.8, "switch-large", SW_LARGE_NOTE),
    *_switch("XL", 32, 785.0, 320.0, 45.2, None, NO_XL),
    # ---- MoMoE (its numbers are in plots only; the text makes two memory claims)
    Claim("MoMoE", "save_percent=0 saves only the minimum and recomputes the rest (less memory)",
          "peak memory of a layer training step, triton recompute=0 / recompute=100 (MoMoE's save_percent)",
          "< 1", "x", PLOTS, "recompute_memory", {"prefer": "momoe-layer"}),
    Claim("MoMoE", "save_percent=100 still saves less than alternate implementations",
          "peak memory of a layer training step, triton recompute=100 / the least of grouped_mm and shuffle",
          "< 1", "x", PLOTS, "memory_vs_others", {"prefer": "momoe-layer"}),
    Claim("MoMoE", "hyper-performant SwiGLU MoE kernel (full-pass and forward speed plots)",
          "layer tokens/s against the other backends", None, "tokens/s", PLOTS, "feature",
          {"model": "momoe-layer", "how": "measured per backend at the README's layer (seeds) and issue 8's "
                                          "shapes (h100 suite); the README gives no number to compare"}),
    # ---- MoE Transformer (no numbers: its techniques, and what moebench can measure of each)
    Claim("MoE Transformer", "group-level routing (n_group 2, topk_group 2)", "router option", None,
          "tokens/s", "none", "feature",
          {"model": "moe-transformer", "fields": ["n_group", "topk_group"],
           "how": "RouterSpec.n_group / topk_group; the seeds suite runs the README's layer with learned, "
                  "group-limited routing"}),
    Claim("MoE Transformer", "capacity management (expert_capacity_factor 1.0, min/max capacity 128/800)",
          "router option", None, "", "none", "feature",
          {"fields": ["capacity_factor"],
           "how": "RouterSpec.capacity_factor (the router drops slots past capacity) and the `capacity` "
                  "backend; the min/max bounds are not expressed; dropped fraction is in the balance suite"}),
    Claim("MoE Transformer", "null expert for overflow tokens (use_null_expert)", "router option", None, "",
          "none", "feature",
          {"fields": ["null_expert"],
           "how": "a router option; its effect on balance and loss needs a training run (balance suite)"}),
    Claim("MoE Transformer", "gradual MoE activation (moe_warmup_steps 100) and aux-loss ramp",
          "router option", None, "", "none", "feature",
          {"fields": ["moe_warmup_steps", "aux_ramp_steps"],
           "how": "a training-schedule option: no throughput effect; its effect on loss needs a training "
                  "run (balance suite)"}),
]


# ----------------------------------------------------------------------------------------------- helpers
def _rows(df: pd.DataFrame | None, *, model=None, prefix=None, ok=True) -> pd.DataFrame:
    if df is None or df.empty or "model" not in df:
        return pd.DataFrame()
    m = pd.Series(True, index=df.index)
    if model is not None:
        m &= df["model"] == model
    if prefix is not None:
        m &= df["model"].astype(str).str.startswith(prefix)
    if ok:
        m &= df["status"] == "ok"
    return df[m]


def _device(row) -> str:
    return f"{row.get('gpu')}, 1 GPU" if row.get("device") == "cuda" else f"CPU ({row.get('gpu') or '?'})"


_num = metrics.finite


def _missing(df, model: str | None, suite: str | None, note: str = "") -> str:
    """Why a claim has no measurement: the non-ok record's status and reason, or the suite to run."""
    tail = f"; {note}" if note else ""
    if model is None:
        return "not measured" + tail
    rows = _rows(df, model=model, ok=False)
    if not rows.empty:
        r = rows.iloc[-1]
        reason = r.get("reason") or "no reason recorded"
        return f"not measured: {model} ended `{r['status']}`: {reason}" + tail
    return f"not measured: no record of {model} in these results (run the `{suite}` suite)" + tail


def _within(measured: float, claimed: float, tol: float) -> bool:
    return abs(measured / claimed - 1.0) <= tol


def _pct(measured: float, claimed: float) -> str:
    return f"{(measured / claimed - 1.0) * 100:+.1f}%"


def _opts(row) -> dict:
    try:
        return json.loads(row.get("backend_options") or "{}")
    except (TypeError, ValueError):
        return {}


_SHAPE = ["level", "mode", "dtype", "routing", "batch", "seq", "d_model", "d_expert", "n_experts", "top_k"]


def _group_key(row) -> tuple:
    return tuple(str(row.get(c)) for c in _SHAPE)


def _verdict(ok: bool) -> str:
    return REPRODUCED if ok else NOT_REPRODUCED


# ------------------------------------------------------------------------------------------- evaluators
# Each returns (measured, measured_device, verdict, why).
def _params(df, c: Claim):
    name = c.args["preset"]
    if name is None:
        return None, "", NOT_COMPARABLE, c.note
    m = PRESETS[name].params()[c.args["which"]] / 1e6
    ok = _within(m, c.claimed, PARAMS_TOL)
    why = f"preset {name}: {m:.1f}M, {_pct(m, c.claimed)} vs claimed (rule: within {PARAMS_TOL:.0%})"
    why += "" if ok or not c.note else f"; {c.note}"
    return round(m, 1), "spec count (no device)", _verdict(ok), why


def _tokens_per_s(df, c: Claim):
    model = c.args.get("model")
    rows = _rows(df, model=model) if model else pd.DataFrame()
    if rows.empty:
        return None, "", NOT_COMPARABLE, _missing(df, model, c.args.get("suite"), c.note)
    r = rows.iloc[-1]
    m, dev = _num(r["tokens_per_s"]), _device(r)
    gpu, n = ("L4", 1) if c.claimed_device.startswith("NVIDIA L4") else ("A100", c.args.get("gpus", 8))
    same = n == 1 and r.get("device") == "cuda" and re.search(rf"\b{gpu}\b", str(r.get("gpu"))) is not None
    if not same:
        return round(m), dev, NOT_COMPARABLE, (f"absolute throughput on {dev} ({r['backend']}) against a "
                                              f"claim on {c.claimed_device}: different hardware"), [r]
    ok = _within(m, c.claimed, REL_TOL)
    return round(m), dev, _verdict(ok), (f"{r['backend']} on the claimed GPU: {_pct(m, c.claimed)} "
                                         f"(rule: within {REL_TOL:.0%})"), [r]


def _peak_memory(df, c: Claim):
    model = c.args.get("model")
    rows = _rows(df, model=model) if model else pd.DataFrame()
    if rows.empty:
        return None, "", NOT_COMPARABLE, _missing(df, model, c.args.get("suite"), c.note)
    r = rows.iloc[-1]
    gib, dev = _num(r.get("peak_gib")), _device(r)
    if gib is None:
        return None, dev, NOT_COMPARABLE, "not measured: the record has no peak memory"
    m = gib * 2**30 / 1e9
    if r.get("device") != "cuda":
        return round(m, 2), dev, NOT_COMPARABLE, "CPU peak RSS is not GPU allocated memory"
    if not c.args.get("workload_known"):
        return round(m, 2), dev, NOT_COMPARABLE, (
            f"{model} at batch {r['batch']} x seq {r['seq']} on one GPU; the claim's batch size is not "
            f"published and it ran on {c.claimed_device.split(',')[0]}")
    ok = _within(m, c.claimed, REL_TOL)
    why = (f"peak allocated, same workload (batch {r['batch']} x seq {r['seq']}); allocated bytes do not "
           f"depend on the GPU model: {_pct(m, c.claimed)} (rule: within {REL_TOL:.0%})")
    return round(m, 2), dev, _verdict(ok), why + ("" if ok or not c.note else f"; {c.note}")


def _stack_pair(df, c: Claim):
    """((fastest optimised row, naive-stack row) on the same GPU, "") or (None, why)."""
    den = _rows(df, model=c.args["den"])
    if den.empty:
        return None, _missing(df, c.args["den"], c.args["suite"])
    base = den.iloc[-1]
    num = _rows(df, prefix=c.args["num"])
    num = num[num["gpu"] == base["gpu"]] if not num.empty else num
    if num.empty:
        tried = _rows(df, prefix=c.args["num"], ok=False)
        reasons = "; ".join(sorted({f"{m}: {s} ({r})" for m, s, r in
                                    zip(tried["model"], tried["status"], tried["reason"])}))
        return None, (f"not measured: no optimised stack ({c.args['num']}*) ended ok on {base['gpu']}"
                      + (f": {reasons}" if reasons else f" (run the `{c.args['suite']}` suite)"))
    best = num.loc[num["tokens_per_s"].astype(float).idxmax()]
    return (best, base), ""


def _speedup(df, c: Claim):
    pair, why = _stack_pair(df, c)
    if pair is None:
        return None, "", NOT_COMPARABLE, why
    best, base = pair
    m = float(best["tokens_per_s"]) / float(base["tokens_per_s"])
    return round(m, 2), _device(best), _verdict(m >= c.claimed * (1 - REL_TOL)), (
        f"fastest optimised stack {best['model']} ({best['backend']}) {float(best['tokens_per_s']):,.0f} "
        f"tok/s vs {base['model']} {float(base['tokens_per_s']):,.0f} tok/s; a ratio, compared across "
        f"devices (claimed on an L4); rule: >= claimed - {REL_TOL:.0%}"), [base, best]


def _memory_ratio(df, c: Claim):
    pair, why = _stack_pair(df, c)
    if pair is None:
        return None, "", NOT_COMPARABLE, why
    best, base = pair
    a, b = _num(best.get("peak_gib")), _num(base.get("peak_gib"))
    if a is None or b is None:
        return None, _device(best), NOT_COMPARABLE, "not measured: a record has no peak memory"
    m = a / b
    return round(m, 2), _device(best), _verdict(m <= c.claimed / (1 - REL_TOL)), (
        f"{best['model']} (the fastest optimised stack) {a:.2f} GiB vs {base['model']} {b:.2f} GiB peak "
        f"allocated; a ratio, compared across devices (claimed on an L4); rule: <= claimed + {REL_TOL:.0%}")


def _balance_of(row) -> str | None:
    for col in ("router_balance", "balance"):
        if isinstance(row.get(col), str):
            return row[col]
    label = f" {row.get('router')} "
    return "aux" if " aux " in label else "bias" if " bias " in label else None


def _balance_ratio(df, c: Claim):
    rows = _rows(df)
    rows = rows[rows["suite"] == c.args["suite"]] if not rows.empty else rows
    if rows.empty:
        return None, "", NOT_COMPARABLE, f"not measured: no ok record of the `{c.args['suite']}` suite"
    if not any(col in rows for col in ("router", "router_balance", "balance")):
        return None, "", NOT_COMPARABLE, ("not measured: this frame has no router column "
                                          "(moebench.report.frame adds it to results.to_frame)")
    groups: dict[tuple, dict] = {}
    for _, r in rows.iterrows():
        bal = _balance_of(r)
        if bal in ("aux", "bias") and _num(r.get("maxvio")) is not None:
            groups.setdefault(_group_key(r) + (r["backend"],), {}).setdefault(bal, []).append(r)
    pairs = [g for g in groups.values() if "aux" in g and "bias" in g]
    if not pairs:
        return None, "", NOT_COMPARABLE, ("not measured: no model and workload was trained with both the "
                                          "aux loss and bias balancing in the balance suite")
    g = pairs[0]
    # every aux setting against every bias setting of the same model and workload; the claim is met when the
    # most favourable pair reaches it, and every pair is listed so the reader sees the range
    ratios = sorted(((float(a["maxvio"]) / float(b["maxvio"]) if float(b["maxvio"]) > 0 else math.inf, a, b)
                     for a in g["aux"] for b in g["bias"]), key=lambda t: -t[0])
    m, _, bias = ratios[0]
    ok = m >= c.args["low"] * (1 - REL_TOL)
    listed = "; ".join(f"{a['model']} {float(a['maxvio']):.3f} / {b['model']} {float(b['maxvio']):.3f} = {r:.2f}x"
                       for r, a, b in ratios)
    return (round(m, 2) if math.isfinite(m) else m), _device(bias), _verdict(ok), (
        f"global MaxVio aux / bias, {bias['level']}/{bias['mode']} batch {bias['batch']} x seq {bias['seq']}: "
        f"{listed}; the best pair is shown; balance does not depend on the device; "
        f"rule: >= {c.args['low']:g} - {REL_TOL:.0%}")


def _triton_groups(df, prefer: str) -> list[list]:
    """Ok layer train-mode rows with a peak memory, grouped by model + workload, groups holding triton only,
    the preferred model first."""
    rows = _rows(df)
    if rows.empty:
        return []
    rows = rows[(rows["mode"] == "train") & (rows["level"] == "layer") & rows["peak_gib"].notna()]
    groups: dict[tuple, list] = {}
    for _, r in rows.iterrows():
        groups.setdefault((r["model"],) + _group_key(r), []).append(r)
    out = [g for g in groups.values() if any(r["backend"] == "triton" for r in g)]
    return sorted(out, key=lambda g: g[0]["model"] != prefer)


def _recompute_memory(df, c: Claim):
    for g in _triton_groups(df, c.args["prefer"]):
        by = {_opts(r).get("recompute"): r for r in g if r["backend"] == "triton"}
        if 0 in by and 100 in by:
            a, b = float(by[0]["peak_gib"]), float(by[100]["peak_gib"])
            tokens = int(by[0]["batch"]) * int(by[0]["seq"])
            return round(a / b, 3), _device(by[0]), _verdict(a / b < 1), (
                f"{by[0]['model']} T={tokens}: {a:.2f} GiB (recompute 0) vs {b:.2f} GiB (recompute 100), "
                f"moebench's triton backend standing in for MoMoE's kernel; rule: < 1")
    return None, "", NOT_COMPARABLE, ("not measured: no layer training case ran the triton backend with both "
                                      "recompute=0 and recompute=100 (seeds/h100 suites)")


def _memory_vs_others(df, c: Claim):
    for g in _triton_groups(df, c.args["prefer"]):
        keep = [r for r in g if r["backend"] == "triton" and _opts(r).get("recompute") == 100]
        others = [r for r in g if r["backend"] in ("grouped_mm", "shuffle")]
        if keep and others:
            t, o = keep[-1], min(others, key=lambda r: float(r["peak_gib"]))
            m = float(t["peak_gib"]) / float(o["peak_gib"])
            return round(m, 3), _device(t), _verdict(m < 1), (
                f"{t['model']}: triton recompute=100 {float(t['peak_gib']):.2f} GiB vs {o['backend']} "
                f"{float(o['peak_gib']):.2f} GiB; rule: < 1")
    return None, "", NOT_COMPARABLE, ("not measured: no layer training case ran triton recompute=100 beside "
                                      "grouped_mm or shuffle")


def _feature(df, c: Claim):
    missing = [f for f in c.args.get("fields", []) if f not in RouterSpec.model_fields]
    expr = f"not expressible yet: RouterSpec has no {', '.join(missing)}" if missing else c.args["how"]
    model = c.args.get("model")
    rows = _rows(df, model=model) if model else pd.DataFrame()
    if rows.empty:
        return None, "", NOT_COMPARABLE, f"no number claimed; {expr}" + (
            f"; {_missing(df, model, 'seeds')}" if model else "")
    best = rows.loc[rows["tokens_per_s"].astype(float).idxmax()]
    return round(float(best["tokens_per_s"])), _device(best), NOT_COMPARABLE, (
        f"no number claimed; {expr}; fastest ok run: {best['backend']} ({best['level']}/{best['mode']})"), [best]


EVALUATORS = {
    "params": _params, "tokens_per_s": _tokens_per_s, "peak_memory": _peak_memory, "speedup": _speedup,
    "memory_ratio": _memory_ratio, "balance_ratio": _balance_ratio, "recompute_memory": _recompute_memory,
    "memory_vs_others": _memory_vs_others, "feature": _feature,
}


def _noisy(row) -> str:
    v = row.get("noisy")
    return v if isinstance(v, str) and v else ""


SINGLE = {"params": "exact (a parameter count)", "peak_memory": "single value (peak memory)",
          "memory_ratio": "single values (peak memory)", "recompute_memory": "single values (peak memory)",
          "memory_vs_others": "single values (peak memory)", "balance_ratio": "single values (MaxVio of training runs)"}


def _precision(used: list) -> tuple[str, str]:
    """(precision cell, a sentence for `why` naming noisy records) for the timed rows a measurement rests on."""
    cells, noisy = [], []
    for r in used:
        hw, spread = _num(r.get("ci_halfwidth")), _num(r.get("spread"))
        cell = (f"±{hw:.1%}" if hw is not None else
                f"no interval, spread {spread:.0%}" if spread is not None else "no interval")
        if _noisy(r):
            cell += ", noisy"
            noisy.append(f"{r['model']} ({r['backend']}): {_noisy(r).split(';')[0]}")
        cells.append((f"{r['model']} " if len(used) > 1 else "") + cell)
    note = (" Timing noisy, read as rough: " + "; ".join(noisy) + ".") if noisy else ""
    ci = " (±: 95% CI of the median)" if any("±" in c for c in cells) else ""
    return "; ".join(cells) + ci, note


def _related(df: pd.DataFrame | None, c: Claim) -> pd.DataFrame:
    """The records a claim reads (any status), to find the execution modes it was measured in."""
    if df is None or df.empty or "model" not in df or "exec" not in df or c.kind == "params":
        return pd.DataFrame()
    a, model = c.args, df["model"].astype(str)
    m = pd.Series(False, index=df.index)
    for key in ("model", "den"):
        if a.get(key):
            m |= model == a[key]
    if a.get("num"):
        m |= model.str.startswith(a["num"])
    if c.kind in ("recompute_memory", "memory_vs_others"):
        m |= (df["mode"] == "train") & (df["level"] == "layer") & df["backend"].isin(["triton", "grouped_mm",
                                                                                      "shuffle"])
    if c.kind == "balance_ratio":
        m |= df["suite"] == a["suite"]
    return df[m]


def _modes(df, c: Claim) -> list[str]:
    present = set(_related(df, c)["exec"].dropna()) if not _related(df, c).empty else set()
    return sorted(present, key=lambda e: (EXEC_ORDER.index(e) if e in EXEC_ORDER else len(EXEC_ORDER), e))


def claims_frame(df: pd.DataFrame | None) -> pd.DataFrame:
    """One row per claim of the five seeds (per claim and execution mode where its records ran in several):
    claimed vs measured (from df), devices, exec mode, precision, verdict and why."""
    out = []
    for c in CLAIMS:
        modes = _modes(df, c)
        runs = [(m, df[df["exec"] == m]) for m in modes] if len(modes) > 1 else [(modes[0] if modes else "", df)]
        for mode, sub in runs:
            res = EVALUATORS[c.kind](sub, c)
            measured, mdev, verdict, why = res[:4]
            precision, note = _precision(res[4] if len(res) > 4 else [])
            if c.kind in SINGLE:
                precision = SINGLE[c.kind] if measured is not None else ""
            out.append({"seed": c.seed, "claim": c.claim, "compared": c.compared, "claimed": c.claimed,
                        "unit": c.unit, "claimed_device": c.claimed_device,
                        "exec": mode or ("any (no timing)" if c.kind == "params" else ""), "measured": measured,
                        "measured_device": mdev, "precision": precision,
                        "verdict": verdict, "why": why + note})
    return pd.DataFrame(out, columns=COLUMNS)
