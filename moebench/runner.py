"""Runs a list of Cases in worker processes: timeouts, crash isolation, fsync'd appends, resume, progress.

Each case runs in a worker process (its own session, so a timeout kills its whole tree). A worker that
crashes, hangs or runs out of memory costs that case only: the runner records it and starts a new worker.
Ctrl-C or SIGTERM ends the run after killing the worker's tree; every finished record is already on disk.
Workers are reused across cases on CUDA (a fresh CUDA context + imports cost seconds per case) and
replaced after every case on CPU (so each record's peak RSS belongs to its own case alone).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from moebench import results
from moebench.spec import Case


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _worker_main(conn, log_path: str) -> None:
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from moebench import envinfo, harness  # imported here: the parent never initialises CUDA

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        case = Case.model_validate(msg["case"])
        print(f"--- {case.key} {case.label}", flush=True)
        env = envinfo.collect(case.device)
        conn.send(harness.run_case(case, msg["run_id"], env))


class _Worker:
    def __init__(self, log_path: Path):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, str(log_path)), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.join(5)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


@dataclass
class RunSummary:
    out: Path
    run_id: str
    records: list[dict] = field(default_factory=list)
    skipped_done: int = 0
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)


def _parent_env(device: str) -> dict:
    from moebench import envinfo
    return envinfo.static() | {"device": device}


def run(cases: list[Case], out: str | Path, *, resume: bool = False, run_id: str | None = None,
        reuse_worker: bool | None = None, progress: bool = True, console=None) -> RunSummary:
    out = results.check_writable(out)
    run_id = run_id or new_run_id()
    summary = RunSummary(out=out, run_id=run_id)
    if resume:
        done, problems = results.done_keys(out)
        summary.warnings += [f"warning: {p}" for p in problems]
        todo = [c for c in cases if c.key not in done]
        summary.skipped_done = len(cases) - len(todo)
    else:
        todo = list(cases)
    if reuse_worker is None:
        reuse_worker = bool(todo) and todo[0].device == "cuda"
    log_path = out.with_suffix(out.suffix + ".log")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    for w in summary.warnings:
        console.print(f"[yellow]{escape(w)}[/]")
    worker: _Worker | None = None
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    prev_sigterm = _sigterm_interrupts()
    try:
        with bar:
            task = bar.add_task("starting", total=len(todo))
            for case in todo:
                bar.update(task, description=escape(case.label[:90]))
                if worker is None or not worker.proc.is_alive():
                    worker = _Worker(log_path)
                rec = _run_one(worker, case, run_id)
                if rec["status"] in ("timeout", "failed") and not worker.proc.is_alive():
                    worker = None
                results.append(out, rec)
                summary.records.append(rec)
                console.print(_line(rec))
                bar.advance(task)
                if not reuse_worker and worker is not None:
                    worker.close()
                    worker = None
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if worker is not None:
            worker.kill() if summary.interrupted else worker.close()
        if prev_sigterm is not None:
            signal.signal(signal.SIGTERM, prev_sigterm)
    return summary


def _sigterm_interrupts():
    """While a run lasts, SIGTERM (`timeout`, a batch scheduler, docker stop) ends it like Ctrl-C: the worker
    lives in its own session and would otherwise outlive the runner, hung and holding its GPU memory."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    prev = signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL if prev is None else prev


def _run_one(worker: _Worker, case: Case, run_id: str) -> dict:
    def rec(status, reason):
        return results.make_record(case, status, run_id=run_id, env=_parent_env(case.device), reason=reason)

    try:
        worker.conn.send({"case": case.model_dump(mode="json"), "run_id": run_id})
    except (BrokenPipeError, OSError) as e:
        worker.kill()
        return rec("failed", f"worker unavailable: {e}")
    t0 = time.monotonic()
    if not worker.conn.poll(case.timeout_s):
        worker.kill()
        return rec("timeout", f"no result after {case.timeout_s:.0f} s; worker process tree killed")
    try:
        return worker.conn.recv()
    except (EOFError, OSError):
        worker.proc.join(5)
        code = worker.proc.exitcode
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        return rec("failed", f"worker {how} after {time.monotonic() - t0:.1f} s")


STYLE = {"ok": "green", "skipped": "yellow", "mismatch": "red", "oom": "magenta", "timeout": "red",
         "failed": "red"}


def _line(rec: dict) -> str:
    st = rec["status"]
    m = rec.get("metrics") or {}
    detail = rec.get("reason", "")
    if st == "ok":
        tps = m["tokens_per_s"]["p50"]
        mem = m.get("memory", {})
        gib = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))
        detail = f"{tps:,.0f} tok/s  spread {m['spread']:.1%}  peak {gib:.2f} GiB"
    return f"[{STYLE[st]}]{st:>8}[/] {escape(rec['label'])}  [dim]{escape(detail)}[/]"  # "[/]" in a reason is text


def summary_table(records: list[dict]):
    from rich.table import Table

    t = Table(title="moebench results", show_lines=False)
    for col in ("model", "backend", "workload", "status", "tokens/s", "spread", "TFLOP/s", "peak GiB", "MaxVio"):
        t.add_column(col, justify="right" if col not in ("model", "backend", "workload", "status") else "left")
    for r in records:
        c, m = r["case"], r.get("metrics") or {}
        w = c["workload"]
        opts = "".join(f",{k}={v}" for k, v in sorted(c.get("backend_options", {}).items()))
        wl = f"{w['level']}/{w['mode']} {w['dtype']} {w['batch']}x{w['seq']} {w['routing']}"
        if r["status"] == "ok":
            mem = m.get("memory", {})
            gib = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))
            bal = m.get("balance", {}).get("global", {})
            row = (f"{m['tokens_per_s']['p50']:,.0f}", f"{m['spread']:.1%}", f"{m['tflops']:.2f}",
                   f"{gib:.2f}", f"{bal.get('maxvio', float('nan')):.3f}")
        else:
            row = ("", "", "", "", "")
        t.add_row(escape(c["model"]["name"]), escape(c["backend"] + opts), escape(wl),
                  f"[{STYLE[r['status']]}]{r['status']}[/]", *row)
    return t


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `moebench` command")
