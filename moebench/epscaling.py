"""Expert parallel against the best one-GPU path: does the second GPU pay for itself?

Pure functions over records (no torch), shared by the launcher (moebench.distributed: metrics.scaling of each
R-rank record) and the report (moebench.report_ep: a table per results file).

The one-GPU candidates of an R-rank record are the ok one-process records of the same model and the same
per-rank workload (level, mode, dtype, routing, batch, seq, seed), whatever the backend (grouped_mm, triton, ...,
or EP itself on one rank) and the execution mode (eager, compile, graphs): the best one GPU can do on those
tokens. speedup = the R-rank tokens/s (all ranks' tokens) / the best one's tokens/s; R GPUs pay for themselves
when it approaches R (the issue's bar on 2 GPUs: 1.8).
"""
from __future__ import annotations

import json

_NOT_SHAPE = ("ranks", "warmup", "repeats", "exec")


def shape_key(rec: dict) -> str:
    """What an R-rank record and a one-GPU record must share: the model and the per-rank workload."""
    c = rec["case"]
    w = {k: v for k, v in c["workload"].items() if k not in _NOT_SHAPE}
    return json.dumps([c["model"], w, c.get("device")], sort_keys=True)


def ranks_of(rec: dict) -> int:
    return rec["case"]["workload"].get("ranks") or 1


def tps(rec: dict) -> float | None:
    v = ((rec.get("metrics") or {}).get("tokens_per_s") or {}).get("p50")
    return float(v) if isinstance(v, (int, float)) else None


def best_one_gpu(rec: dict, pool: list[dict]) -> dict:
    """rec (an ok R-rank record) against the fastest ok one-process record in `pool` on its per-rank shape:
    {speedup, baseline_backend, baseline_options, baseline_exec, baseline_tokens_per_s, baseline_case_key,
    baseline_noisy}, or {speedup: None, reason} when the pool has none."""
    key = shape_key(rec)
    cands = [b for b in pool if b.get("status") == "ok" and ranks_of(b) == 1 and tps(b) and shape_key(b) == key]
    if not cands:
        return {"speedup": None, "reason": "no ok one-GPU record of this model and per-rank workload in the file"}
    b = max(cands, key=tps)
    mine = tps(rec)
    return {"speedup": mine / tps(b) if mine else None, "baseline_backend": b["case"]["backend"],
            "baseline_options": b["case"].get("backend_options") or {},
            "baseline_exec": b["case"]["workload"].get("exec", "eager"), "baseline_tokens_per_s": tps(b),
            "baseline_case_key": b["case_key"], "baseline_noisy": bool((b.get("metrics") or {}).get("noisy"))}
