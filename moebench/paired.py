"""Paired, interleaved timing of backends on one model and workload (`moebench paired`).

Cases timed one after another see different clocks, temperatures and power-cap states. On the H100, the
mixtral-like layer's event-timed steps and the profiled steps right after them differed by -5% for triton
and +7% for grouped_mm in the same process (results/triton_dev/v8_profile_gaps_h100.log). A ratio between
two backends is only as good as the assumption that both saw the same GPU.

Here every case of a group (same model, workload and device; other backends or options) is checked as in a
suite run (parity against naive), warmed up, and then timed in rounds: each round runs one untimed lead-in
step and then `steps` timed steps of every case in turn. The order is rotated from round to round, so each
round gives one ratio per case from one time window. Reported per case: tokens/s over all its samples, and
the speed-up against the base case (the first backend named) as the median of the per-round ratios, with a
95% bootstrap interval over rounds (scipy) when there are at least 3 rounds. On CUDA, nvidia-smi samples SM
clock, power and throttle reasons in the background (moebench/telemetry.py); each case gets the summary of
the samples taken while its timed blocks ran, so a speed-up bought or lost at the power cap shows as such.
Time only: every case's layer and buffers are alive at once, so peak memory is not measured here (`moebench
run` does that). A case that is skipped, fails parity or raises is reported with its reason; the others
still run.
"""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch

from moebench import core, envinfo, telemetry
from moebench.registry import get
from moebench.spec import Case

KIND, SCHEMA = "moebench-paired", 1


def group_key(c: Case) -> str:
    """The case label without its backend part and its gemm dtype: model | workload (an fp8 case is paired with
    its bf16 base)."""
    model, _backend, work = c.label.split(" | ", 2)
    work = work.replace(f" gemm={c.workload.gemm_dtype}", "")
    return f"{model} | {work} | {c.device}"


def _is_base(c: Case, base: str) -> bool:
    return c.backend == base and c.workload.gemm_dtype == "default"


def groups(cases: list[Case], base: str) -> list[list[Case]]:
    """Cases grouped by model, workload (any gemm dtype) and device; within a group the base backend's case in the
    default gemm dtype comes first. Groups without one, or with a single case, are left out: nothing to pair."""
    by: OrderedDict[str, list[Case]] = OrderedDict()
    for c in cases:
        by.setdefault(group_key(c), []).append(c)
    out = []
    for g in by.values():
        g = sorted(g, key=lambda c: not _is_base(c, base))  # stable: the suite's order otherwise
        if len(g) >= 2 and _is_base(g[0], base):
            out.append(g)
    return out


def _prepare(case: Case, device: torch.device):
    """(step, entry): a step ready to time (parity passed, warmed up), or None and the entry saying why not."""
    entry = {"case_key": case.key, "label": case.label, "backend": case.backend,
             "options": case.backend_options}
    backend, w = get(case.backend), case.workload
    reason = core.skip_reason(case, backend)
    if reason is None and backend.needs_process_group:
        reason = "needs a process group: pair it with `moebench run --nproc N` instead"
    if reason is None and w.level not in ("layer", "model"):
        reason = f"level '{w.level}' is not timed step by step"
    if reason:
        return None, entry | {"status": "skipped", "reason": reason}
    try:
        entry["parity"] = core.parity(case)
        if not entry["parity"]["ok"]:
            return None, entry | {"status": "mismatch", "reason": core.mismatch_reason(entry["parity"])}
        step = core.build_step(case, device)
        entry["warmup_steps"] = core.warm_up(step, w.warmup, device)[0]
        entry["exec"] = step.exec_info
        return step, entry
    except Exception as e:  # noqa: BLE001 - one failing case never stops the others
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, entry | {"status": "failed", "reason": f"{type(e).__name__}: {core.first_line(e)}"}


@contextmanager
def _sampler(device: torch.device):
    """nvidia-smi samples on CUDA (or with MOEBENCH_SMI set, as tests do); None otherwise."""
    if device.type != "cuda" and not os.environ.get("MOEBENCH_SMI"):
        yield None
        return
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    with telemetry.Sampler(gpu_index=int(vis) if vis.isdigit() else 0) as smi:
        yield smi


def _interval(ratios: list[float]) -> list[float] | None:
    if len(ratios) < 3 or len(set(ratios)) < 2:
        return None
    from scipy.stats import bootstrap
    res = bootstrap((np.asarray(ratios),), np.median, confidence_level=0.95, n_resamples=2000,
                    method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def _speedup(base_rounds: list[list[float]], rounds: list[list[float]]) -> dict:
    """Speed-up against the base from the blocks of the same rounds: per round, the base's median step time over
    this case's; their median, and the bootstrap interval of that median."""
    ratios = [float(np.median(b) / np.median(c)) for b, c in zip(base_rounds, rounds)]
    return {"ratio_rounds": ratios, "ratio": float(np.median(ratios)) if ratios else math.nan,
            "ratio_ci95": _interval(ratios)}


def backend_of(entry: dict) -> str:
    """The backend part of a case's label, options included (`triton,recompute=100`)."""
    return entry["label"].split(" | ")[1]


def base_text(result: dict, quote: str = "") -> str:
    """The base backend as titles say it: `grouped_mm`, or `sonicmoe (re-based from grouped_mm)`."""
    q = quote
    rebased = f" (re-based from {q}{result['rebased_from']}{q})" if result.get("rebased_from") else ""
    return f"{q}{result['base_backend']}{q}{rebased}"


def load(path) -> dict:
    """A saved `moebench paired` result (its JSON). Raises ValueError naming the file and what is wrong."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(result, dict) or result.get("kind") != KIND or not isinstance(result.get("groups"), list):
        raise ValueError(f"{path}: not a `moebench paired` result (no kind '{KIND}' with groups)")
    return result


def rebase(result: dict, base: str) -> dict:
    """The same measurement with the speed-ups taken against another backend of each group (`base` as in a
    label's backend part, e.g. `sonicmoe` or `triton,recompute=100`): per-round ratios pair the blocks of one
    round, as when it ran. A group without an ok case of `base` keeps its cases with no ratio, and says why.
    Raises ValueError naming the valid choices when no group has one."""
    choices = sorted({backend_of(e) for g in result["groups"] for e in g["cases"] if e["status"] == "ok"})
    if base not in choices:
        raise ValueError(f"no ok case of backend '{base}' in this result; valid: {', '.join(choices) or 'none'}")
    out = {**result, "base_backend": base, "rebased_from": result.get("rebased_from", result["base_backend"]),
           "groups": []}
    for g in result["groups"]:
        cases = [dict(e) for e in g["cases"]]
        b = next((e for e in cases if e["status"] == "ok" and backend_of(e) == base), None)
        for e in cases:
            for k in ("ratio_rounds", "ratio", "ratio_ci95", "why_no_ratio"):
                e.pop(k, None)
            if b is None:
                e |= {"ratio": None, "why_no_ratio": f"no ok case of {base} in this group"}
            elif e["status"] == "ok":
                e |= _speedup(b["samples_ms"], e["samples_ms"])
        if b is not None:
            cases.sort(key=lambda e: e is not b)
        out["groups"].append({**g, "base": b["label"] if b else None, "cases": cases})
    return out


def run_group_job(cases: list[dict], rounds: int, steps: int) -> dict:
    """In a worker process (moebench.runner): one group, as run_group, with the env block it ran in."""
    cs = [Case.model_validate(c) for c in cases]
    return run_group(cs, rounds, steps) | {"env": envinfo.collect(cs[0].device)}


def run_group(cases: list[Case], rounds: int, steps: int, on_round=None) -> dict:
    """Time one group (base case first) in `rounds` interleaved rounds of `steps` timed steps per case."""
    device = torch.device(cases[0].device)
    w = cases[0].workload
    core.apply_memory_budget(cases[0])
    torch.manual_seed(w.seed)
    core.reset_compiler()  # once: each case's compiled code must live until its last round
    prepared = [_prepare(c, device) for c in cases]
    live = [(i, step) for i, (step, _) in enumerate(prepared) if step is not None]
    entries = [e for _, e in prepared]
    flush = core.l2_flush(cases[0], device)
    samples: dict[int, list[list[float]]] = {i: [] for i, _ in live}
    windows: dict[int, list[tuple[float, float]]] = {i: [] for i, _ in live}
    nxt = {i: entries[i]["warmup_steps"] for i, _ in live}  # step indices go on from the warm-up's (inputs)
    with _sampler(device) as smi, core.collector_off():
        for r in range(rounds if len(live) >= 2 else 0):
            order = live[r % len(live):] + live[:r % len(live)]
            for i, step in order:
                try:
                    core.timed_block(step, nxt[i], 1, device)  # lead-in: the last case's kernels are done
                    t0 = time.monotonic()
                    ms, _ = core.timed_block(step, nxt[i] + 1, steps, device, flush)  # ends with a sync
                    windows[i].append((t0, time.monotonic()))
                except Exception as e:  # noqa: BLE001
                    why = f"round {r}: {type(e).__name__}: {core.first_line(e)}"
                    entries[i] |= {"status": "failed", "reason": why}
                    live = [(j, s) for j, s in live if j != i]
                    samples.pop(i)
                    continue
                nxt[i] += steps + 1
                samples[i].append(ms)
            if on_round:
                on_round(r)
    base = samples.get(0) or None
    for i, per_round in samples.items():
        allms = [x for blk in per_round for x in blk]
        if not allms:  # no rounds ran: it was the group's only case that could run
            entries[i] |= {"status": "skipped", "reason": "no other case of its group ran: nothing to pair with"}
            continue
        med = float(np.median(allms))
        tps = w.tokens / (med / 1e3)
        e = entries[i] | {"status": "ok", "samples_ms": per_round, "step_ms_p50": med,
                          "tokens_per_s_p50": tps, "tflops": tps * prepared[i][0].flops_per_token / 1e12}
        if smi is not None:  # clocks and power while this case's timed blocks ran
            e["telemetry"] = smi.summary(windows[i]) if smi.error is None else {"error": smi.error}
        if base is not None:
            e |= _speedup(base, per_round)
        entries[i] = e
    if base is None:
        for e in entries:
            e.setdefault("ratio", None)
            e.setdefault("why_no_ratio", "the base case did not run")
    del prepared, live
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"group": group_key(cases[0]), "base": cases[0].label, "cases": entries}


def run(cases: list[Case], base: str, rounds: int, steps: int, progress=None, log_path=None,
        wait: bool = True) -> dict:
    """Every group in a worker process of its own (moebench.runner.Worker: a crash, hang or OOM costs that group;
    its timeout is the sum of its cases'), holding the device's lock while it runs."""
    import tempfile
    from pathlib import Path

    from moebench.devicelock import DeviceLock
    from moebench.runner import Worker, WorkerLost, flag_busy

    gs = groups(cases, base)
    out = {"kind": KIND, "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds,
           "steps": steps, "base_backend": base, "env": envinfo.parent(cases[0].device) if cases else {},
           "groups": []}
    log_path = Path(log_path or Path(tempfile.gettempdir()) / "moebench-paired.log")
    for g in gs:
        task = progress.add_task(group_key(g[0]), total=1) if progress else None
        worker = Worker(log_path)
        try:
            with DeviceLock(g[0].device, wait=wait) as lock:
                res = worker.job("moebench.paired:run_group_job", {"cases": [c.model_dump(mode="json") for c in g],
                                 "rounds": rounds, "steps": steps}, sum(c.timeout_s for c in g))
            out["env"] = res.pop("env")
            if lock.busy:
                res["device_busy"] = lock.busy
                for e in res["cases"]:
                    flag_busy({"status": e["status"], "metrics": e}, lock.busy)
        except WorkerLost as e:
            res = {"group": group_key(g[0]), "base": g[0].label,
                   "cases": [{"case_key": c.key, "label": c.label, "backend": c.backend,
                              "options": c.backend_options, "status": "timeout" if e.timeout else "failed",
                              "reason": f"the group's worker: {e}", "ratio": None,
                              "why_no_ratio": "the group did not finish"} for c in g]}
        finally:
            worker.close()
        out["groups"].append(res)
        if progress:
            progress.advance(task)
    return out


# ------------------------------------------------------------------------------------------------ rendering
COLUMNS = ("model / workload", "backend", "status", "tok/s p50", "TFLOP/s", "x base (median of rounds)", "95% CI",
           "rounds min..max", "SM MHz / W / power-capped")


def rows(result: dict) -> list[list[str]]:
    """One row of COLUMNS per case, as text (the terminal table and the markdown file share it)."""
    out = []
    for g in result["groups"]:
        for e in g["cases"]:
            ok = e["status"] == "ok"
            rr, ci, tel = e.get("ratio_rounds") or [], e.get("ratio_ci95"), e.get("telemetry") or {}
            smi = (f"{tel['sm_mhz_mean']:.0f} / {tel['power_w_mean']:.0f} / {tel['power_cap_frac']:.0%}"
                   if "sm_mhz_mean" in tel else tel.get("error", ""))
            out.append([g["group"].replace(" | ", " / "), e["label"].split(" | ")[1],
                        e["status"] if ok else f"{e['status']}: {e['reason']}",
                        f"{e['tokens_per_s_p50']:,.0f}" if ok else "", f"{e['tflops']:.3g}" if ok else "",
                        f"{e['ratio']:.3f}x" if ok and e.get("ratio") is not None else "",
                        f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                        f"{min(rr):.3f}..{max(rr):.3f}" if rr else "", smi])
    return out


def markdown(result: dict) -> str:
    """The result as a markdown table (one row per case), with the environment it ran in."""
    env = result.get("env") or {}
    lines = [(f"# moebench paired: {result['rounds']} rounds x {result['steps']} timed steps per case, "
              f"base {base_text(result, '`')}"), "",
             (f"{env.get('gpu') or env.get('cpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
              f"commit {env.get('git_commit')}, created {result.get('created')}"), "",
             "| " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|---:|---:|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict) -> bytes | None:
    """PNG: per group, each case's per-round speed-ups against the base (dots), their median (bar) and the 95%
    interval (whisker); the line at 1 is the base. None when no case has a ratio."""
    import io

    from matplotlib.figure import Figure

    gs = [g for g in result["groups"] if any(e.get("ratio_rounds") for e in g["cases"][1:])]
    if not gs:
        return None
    fig = Figure(figsize=(8, 1.2 + 0.5 * sum(len(g["cases"]) for g in gs)))
    axes = fig.subplots(len(gs), 1, squeeze=False)[:, 0]
    for ax, g in zip(axes, gs, strict=True):
        cases = [e for e in g["cases"] if e.get("ratio_rounds")]
        for y, e in enumerate(cases):
            rr = e["ratio_rounds"]
            ax.barh(y, e["ratio"], color="#4c72b0", alpha=0.35, height=0.6)
            ax.scatter(rr, [y] * len(rr), s=12, color="#4c72b0", zorder=3)
            if e.get("ratio_ci95"):
                lo, hi = e["ratio_ci95"]
                ax.errorbar(e["ratio"], y, xerr=[[e["ratio"] - lo], [hi - e["ratio"]]], color="black",
                            capsize=3)
        ax.axvline(1.0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(cases)), [e["label"].split(" | ")[1] for e in cases])
        ax.set_title(g["group"], fontsize=9)
        ax.set_xlabel(f"tokens/s vs {result['base_backend']} (per round; bar = median)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
