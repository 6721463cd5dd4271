"""Report section: expert parallel against the best one-GPU record of the same results file (moebench.epscaling),
with the all-to-all share, the exchange bandwidth and the padding of each multi-rank record."""
from __future__ import annotations

from moebench import epscaling
from moebench.reportparts import Section, Table, fmt, pct


def _file(rec: dict) -> str:
    return str(rec.get("_source") or "").rpartition(":")[0] or "?"


def ep_table(records: list[dict]) -> Table | None:
    """One row per ok multi-rank record (the last of each case key per file), its baseline taken from its own
    file."""
    by_file: dict[str, dict[str, dict]] = {}
    for r in records:
        by_file.setdefault(_file(r), {})[r.get("case_key")] = r  # the last record of a case wins
    rows = []
    for f, recs in by_file.items():
        pool = list(recs.values())
        for r in pool:
            if r.get("status") != "ok" or epscaling.ranks_of(r) < 2:
                continue
            c, m = r["case"], r.get("metrics") or {}
            ep = m.get("ep") or {}
            best = epscaling.best_one_gpu(r, pool)
            opts = "".join(f",{k}={v}" for k, v in sorted((c.get("backend_options") or {}).items()))
            gbps = ep.get("gbps_by_kind") or {}
            base = best.get("reason", "")
            if best.get("speedup"):
                base = f"{best['baseline_backend']} {best['baseline_exec']}: {fmt(best['baseline_tokens_per_s'])}" \
                    + (" noisy" if best.get("baseline_noisy") else "")
            rows.append([str(c["model"].get("name")), c["backend"] + opts, c["workload"].get("exec", "eager"),
                         str(epscaling.ranks_of(r)), fmt(ep.get("tokens_per_rank")), fmt(epscaling.tps(r))
                         + (" noisy" if m.get("noisy") else ""), base,
                         f"{best['speedup']:.2f}x" + (" (noisy)" if m.get("noisy") or best.get("baseline_noisy") else "")
                         if best.get("speedup") else "", pct(ep.get("a2a_share")),
                         fmt(gbps.get("dispatch")), fmt(gbps.get("combine")),
                         fmt((ep.get("a2a_bytes_per_step") or 0) / 2**20) if ep.get("a2a_bytes_per_step") else "",
                         pct(ep.get("padding_frac")) if ep.get("padding_frac") else "", f])
    if not rows:
        return None
    return Table("Expert parallel against the best one-GPU record", [
        "model", "backend", "exec", "ranks", "tokens/rank", "tokens/s (all ranks)", "best one GPU (same file)",
        "speed-up", "a2a share", "dispatch GB/s", "combine GB/s", "a2a MiB/step/rank", "padding", "file"], rows,
        "best one GPU: the fastest ok one-process record in the same results file with the same model and per-rank "
        "workload, any backend and execution mode (moebench/epscaling.py); speed-up = tokens/s over all ranks / its "
        "tokens/s (R GPUs pay for themselves as it nears R). a2a share: median over steps of the exchange time / "
        "step time (none under graphs: a replay times no exchange on its own). GB/s: bytes a rank sends to other "
        "ranks in the forward dispatch (combine) / that exchange's median time on the rank, averaged over ranks. "
        "a2a MiB/step/rank: every exchange of a step, forward and backward, padding included. padding: ep-padded's "
        "padding rows / rows received.")


def ep_section(records: list[dict]) -> Section | None:
    t = ep_table(records)
    return Section("ep", "Expert parallel", tables=[t]) if t is not None else None
