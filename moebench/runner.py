"""Runs a list of Cases in worker processes: timeouts, crash isolation, fsync'd appends, resume, progress.

Each case runs in a worker process (its own session, so a timeout kills its whole tree; it dies with the parent,
even a SIGKILLed one). A worker that crashes, hangs or runs out of memory costs that case only: the runner
records it and starts a new worker. Ctrl-C or SIGTERM ends the run after killing the worker's tree; every
finished record is already on disk. Workers are reused across cases on CUDA (a fresh CUDA context + imports cost
seconds per case) and replaced after every case on CPU (so each record's peak RSS belongs to its own case alone).
Every case is timed holding its device's lock (moebench.devicelock): a second run waits, or with --no-wait flags
what it times as noisy.

A worker runs any job it is sent by name ("module:function", keyword arguments as JSON-able data): `run` sends
moebench.runner:run_case_job, `paired` sends its groups the same way (moebench.paired:run_group_job).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rich.markup import escape

from moebench import console as cons
from moebench import envinfo, results
from moebench.devicelock import DeviceLock
from moebench.results import RunSummary, new_run_id
from moebench.spec import Case

__all__ = ["RunSummary", "Worker", "default_device", "die_with_parent", "new_run_id", "run", "run_case_job"]


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: this process gets SIGKILL when its parent dies, even a SIGKILLed parent (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_case_job(case: dict, run_id: str) -> dict:
    """In a worker: one case -> one record (imports here: the parent never initialises CUDA)."""
    from moebench import harness
    c = Case.model_validate(case)
    print(f"--- {c.key} {c.label}", flush=True)
    return harness.run_case(c, run_id, envinfo.collect(c.device))


def _worker_main(conn, log_path: str, parent_pid: int) -> None:
    os.setsid()
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        mod, fn = msg["job"].split(":")
        conn.send(getattr(importlib.import_module(mod), fn)(**msg["args"]))


class Worker:
    """A spawned worker process; job(name, args, timeout_s) returns its result, or raises WorkerLost."""

    def __init__(self, log_path: Path):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, str(log_path), os.getpid()), daemon=True)
        self.proc.start()
        child.close()

    def job(self, name: str, args: dict, timeout_s: float):
        try:
            self.conn.send({"job": name, "args": args})
        except (BrokenPipeError, OSError) as e:
            self.kill()
            raise WorkerLost(f"worker unavailable: {e}") from None
        t0 = time.monotonic()
        if not self.conn.poll(timeout_s):
            self.kill()
            raise WorkerLost(f"no result after {timeout_s:.0f} s; worker process tree killed", timeout=True)
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            raise WorkerLost(f"worker {how} after {time.monotonic() - t0:.1f} s") from None

    def alive(self) -> bool:
        return self.proc.is_alive()

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


class WorkerLost(RuntimeError):
    def __init__(self, msg: str, timeout: bool = False):
        super().__init__(msg)
        self.timeout = timeout


def progress_bar(console, enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=True)


def flag_busy(rec: dict, busy: str | None) -> dict:
    """A record timed while another process held the device: noisy, with the holder named."""
    if busy and rec["status"] == "ok":
        m = rec["metrics"]
        m["noisy"] = "; ".join(x for x in (m.get("noisy"), busy) if x)
        m["device_busy"] = busy
    return rec


def run(cases: list[Case], out: str | Path, *, resume: bool = False, run_id: str | None = None,
        reuse_worker: bool | None = None, progress: bool = True, console=None, wait: bool = True) -> RunSummary:
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

    console = console or Console(stderr=True)
    for w in summary.warnings:
        console.print(f"[yellow]{escape(w)}[/]")
    worker: Worker | None = None
    bar = progress_bar(console, progress)
    prev_sigterm = _sigterm_interrupts()
    try:
        with bar:
            task = bar.add_task("starting", total=len(todo))
            for case in todo:
                bar.update(task, description=escape(case.label[:90]))
                if worker is None or not worker.alive():
                    worker = Worker(log_path)
                with DeviceLock(case.device, wait=wait, on_wait=lambda m: console.print(f"[yellow]{escape(m)}[/]")) \
                        as lock:
                    rec = _run_one(worker, case, run_id)
                if rec["status"] in ("timeout", "failed") and not worker.alive():
                    worker = None
                rec = flag_busy(rec, lock.busy)
                results.append(out, rec)
                summary.records.append(rec)
                console.print(cons.line(rec))
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


def _run_one(worker: Worker, case: Case, run_id: str) -> dict:
    try:
        return worker.job("moebench.runner:run_case_job", {"case": case.model_dump(mode="json"), "run_id": run_id},
                          case.timeout_s)
    except WorkerLost as e:
        return results.make_record(case, "timeout" if e.timeout else "failed", run_id=run_id,
                                   env=envinfo.parent(case.device), reason=str(e))


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `moebench` command")
