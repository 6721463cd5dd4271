"""Record schema, the append-only JSONL store (file-locked, fsync'd) and loading into pandas.

A record is one JSON object per case per run:
  schema, run_id, suite, case_key, label, case (full spec, backend, options, workload), status, reason,
  env (gpu, driver, cuda, torch, triton, python, host, moebench version, git commit + dirty, ceiling),
  metrics (step_ms {p20,p50,p80,samples}, tokens_per_s {p20,p50,p80}, tflops, mfu_measured, mfu_datasheet,
  memory {peak_allocated_gib, peak_reserved_gib | peak_rss_gib}, balance {...}, parity {...}, loss_curve,
  weight_layout: how the expert weights were stored, moebench.registry.WEIGHT_LAYOUTS; absent in older records =
  canonical,
  precision {target, reached, ci95_ms [lo, hi] of the median step time, halfwidth (relative), n_steps, n_blocks,
  block_steps, block_p50_ms, time_s, max_time_s}: timing ran until the 95% interval of the median was within
  target, or max_time_s was spent (moebench.core.timing),
  noisy: null, or why the timing is not one trustworthy number (precision not reached, spread over 10%, drift
  over 5%, another process timing the device); such a record is shown as noisy, never as a plain number,
  exec {mode, compile_s | capture_s, graph_breaks, recompiles, ...}: the execution mode and its set-up costs,
  backend_path: the code path a backend took where it has more than one (e.g. grouped_mm's fallback);
  parity of a gemm_dtype fp8 case: errors vs the fp8 reference, tols (per tensor), reference_self_error, fp8_cost
  and vs_naive (the end-to-end error vs the unquantised naive MoE), detects_unquantised: moebench/core/parity.py)
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 1
STATUSES = ("ok", "skipped", "mismatch", "oom", "timeout", "failed")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class RunSummary:
    """What one `moebench run` did: where its records went and which ones it wrote this time."""
    out: Path
    run_id: str
    records: list[dict] = field(default_factory=list)
    skipped_done: int = 0
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)


def make_record(case, status: str, *, run_id: str, env: dict, reason: str = "", metrics: dict | None = None) -> dict:
    assert status in STATUSES, status
    return {
        "schema": SCHEMA, "run_id": run_id, "suite": case.suite, "case_key": case.key, "label": case.label,
        "case": case.model_dump(mode="json"), "status": status, "reason": reason, "env": env,
        "metrics": metrics or {},
    }


class ResultsPathError(OSError):
    pass


def check_writable(path: str | Path) -> Path:
    """Fail before any case runs when the results file cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ResultsPathError(f"cannot write results file {path}: {e.strerror or e}") from e
    return path


def _finite(x):
    """NaN and inf are not JSON: they are stored as null (a NaN parity error or loss must not stop the suite)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def append(path: str | Path, record: dict) -> None:
    """Append one record as one line, under an exclusive lock, flushed and fsync'd before returning.
    A last line cut short by a crash (no newline) is ended first, so this record stays a line of its own.
    A write that fails (disk full, a lost mount) raises ResultsPathError naming the file."""
    line = json.dumps(_finite(record), separators=(",", ":"), allow_nan=False, default=str) + "\n"
    try:
        with open(path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                size = os.fstat(f.fileno()).st_size
                if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                    line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    except OSError as e:
        raise ResultsPathError(f"cannot write results file {path}: {e.strerror or e}") from e


@dataclass
class Loaded:
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "file:line: what is wrong"


def read(paths, *, strict_schema: bool = True) -> Loaded:
    """Read JSONL results files; bad lines become problems (file and line named), good lines are kept."""
    out = Loaded()
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            out.problems.append(f"{p}: cannot read: {e.strerror or e}")
            continue
        if not text.strip():
            out.problems.append(f"{p}: empty file, no records")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                out.problems.append(f"{p}:{n}: not a JSON record ({e.msg}); line skipped")
                continue
            if not isinstance(rec, dict) or "case_key" not in rec or "status" not in rec:
                out.problems.append(f"{p}:{n}: not a moebench record (no case_key/status); line skipped")
                continue
            if strict_schema and rec.get("schema") != SCHEMA:
                out.problems.append(f"{p}:{n}: unknown schema version {rec.get('schema')!r} "
                                    f"(this moebench reads {SCHEMA}); line skipped")
                continue
            rec["_source"] = f"{p}:{n}"
            out.records.append(rec)
    return out


def done_keys(path: str | Path) -> tuple[set[str], list[str]]:
    """case_keys already recorded in a results file (for --resume), and warnings for corrupt lines."""
    if not Path(path).exists() or Path(path).stat().st_size == 0:  # empty: interrupted before any record
        return set(), []
    loaded = read(path)
    return {r["case_key"] for r in loaded.records}, loaded.problems


def to_frame(records: list[dict]):
    """Flatten records into one pandas row per record (the columns report/compare use)."""
    import pandas as pd

    rows = []
    for r in records:
        c, m, w = r.get("case", {}), r.get("metrics", {}) or {}, r.get("case", {}).get("workload", {})
        mod = c.get("model", {})
        tps, ms, mem = m.get("tokens_per_s", {}) or {}, m.get("step_ms", {}) or {}, m.get("memory", {}) or {}
        bal = (m.get("balance") or {}).get("global", {}) or {}
        env = r.get("env", {}) or {}
        prec = m.get("precision") or {}
        ex = m.get("exec") or {}
        rows.append({
            "run_id": r.get("run_id"), "suite": r.get("suite"), "case_key": r.get("case_key"),
            "label": r.get("label"), "status": r.get("status"), "reason": r.get("reason", ""),
            "model": mod.get("name"), "backend": c.get("backend"),
            "backend_options": json.dumps(c.get("backend_options", {}), sort_keys=True),
            "level": w.get("level"), "mode": w.get("mode"), "exec": w.get("exec", "eager"), "dtype": w.get("dtype"),
            "gemm_dtype": w.get("gemm_dtype", "default"),  # the expert GEMMs' precision (older records: default)
            "routing": w.get("routing"),
            "batch": w.get("batch"), "seq": w.get("seq"), "tokens": (w.get("batch") or 0) * (w.get("seq") or 0) * (w.get("ranks") or 1),  # a step's, every rank's (as tokens/s)
            "d_model": mod.get("d_model"), "d_expert": mod.get("d_expert"), "n_experts": mod.get("n_experts"),
            "top_k": mod.get("top_k"),
            "tokens_per_s": tps.get("p50"), "tokens_per_s_p20": tps.get("p20"), "tokens_per_s_p80": tps.get("p80"),
            "step_ms": ms.get("p50"), "step_ms_samples": ms.get("samples"), "spread": m.get("spread"),
            "ci95_ms": prec.get("ci95_ms"), "precision_target": prec.get("target"),
            "precision_reached": prec.get("reached"), "ci_halfwidth": prec.get("halfwidth"),
            "noisy": m.get("noisy") if r.get("status") == "ok" else None,
            "compile_s": ex.get("compile_s"), "capture_s": ex.get("capture_s"), "graph_breaks": ex.get("graph_breaks"),
            "tflops": m.get("tflops"), "mfu_measured": m.get("mfu_measured"),
            # a peak that is not the step's (metrics.memory.not_the_step says why) is not shown or compared
            "peak_gib": None if mem.get("not_the_step") else mem.get("peak_allocated_gib", mem.get("peak_rss_gib")),
            "memory_note": mem.get("not_the_step"),
            # allocated: the torch allocator's peak on CUDA (deterministic for a seed); rss: a CPU worker's RSS
            # high-water mark (imports, allocator arenas, earlier cases in a reused worker: it moves between runs)
            "peak_kind": "rss" if "peak_rss_gib" in mem else ("allocated" if "peak_allocated_gib" in mem else None),
            "maxvio": bal.get("maxvio"), "cv": bal.get("cv"),
            "weight_layout": m.get("weight_layout", "canonical") if m else None,
            "gpu": env.get("gpu") or env.get("cpu"), "device": env.get("device"),
            "torch": env.get("torch"), "commit": env.get("git_commit"), "source": r.get("_source"),
        })
    return pd.DataFrame(rows)
