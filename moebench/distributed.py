"""Expert-parallel cases on torch.distributed, launched with torchrun: `moebench run --suite ep --nproc N`.

Legend: R ranks of a case, r a rank, T tokens per rank (workload batch x seq), Tg = R*T global tokens.

Launcher (this process, no CUDA): starts `python -m torch.distributed.run --standalone --nproc-per-node N
-m moebench.distributed PLAN` in its own session. The N workers init one process group (NCCL on CUDA, gloo on
CPU) and walk the plan's cases in order. A case spans workload.ranks ranks (1 when unset): ranks 0..R-1 run it
in their own subgroup, the others wait, so 1-rank baselines and 2-rank cases come from the same launch and the
same results file. Cases run sorted by ranks (baselines first). Each case is parity (EP vs naive on the global
batch) then timing; rank 0 gathers every rank's metrics into the record and writes it to the launch directory;
the launcher appends it to the results file and computes scaling efficiency against the 1-rank cases recorded
so far. Files in the launch directory are the only channel: <i>.start (rank 0 began case i), <i>.json (its
record), <i>.rank<r>.err (rank r failed), rank<r>.state (what each rank is doing).

Faults: a rank whose case fails (exception, OOM) writes its error and exits, since its peers may wait for it in
a collective forever; torchrun then stops the others. A case with no record after its timeout_s is a timeout.
Either way the launcher kills the whole tree (torchrun starts each worker in its own session, so the launcher
walks /proc for them) and relaunches the remaining cases. The process group's own timeout is the largest case
timeout + 120 s, so the launcher's clock is what ends a hang.

Several nodes (`--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`, the same command on every node but R): each
node's launcher starts `torchrun --nnodes N --nproc-per-node n --rdzv-backend c10d --rdzv-endpoint HOST:PORT`, and
the N x n workers meet in torchrun's c10d rendezvous. torchrun numbers the nodes in its own order (it ignores
--node-rank under c10d), so a worker takes rank R*n + local rank itself: rank 0 is on node 0, the lead, whose
launcher owns the plan, the timeouts, the relaunches and the results file. The other launchers follow: their
workers read the lead's plan from the rendezvous store, and they relaunch when the lead does (after a fault), each
launch a new rendezvous id (moebench-<launch number>). Between cases the ranks meet in the store (rank 0 sets
done<i>), not in the launch directory, which only the lead's node sees; a rank's error goes to the store too, and
rank 0 copies it into the lead's launch directory.

Scaling efficiency of an R-rank case = its tokens/s / (R x tokens/s of the 1-rank case it is compared with):
weak = the 1-rank case with the same per-rank batch, strong = the one with the same global batch (batch x R).
Both use the same backend and options; `weak_local` / `strong_local` compare with the local backend alone
(e.g. grouped_mm with no exchange at all) when the suite has it. `vs_best_one_gpu` (moebench.epscaling) compares
with the fastest one-process record of the same per-rank shape recorded so far, any backend and execution mode.
"""
from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from moebench import console as cons
from moebench import core, envinfo, epscaling, harness, metrics, results
from moebench.devicelock import DeviceLock
from moebench.registry import get
from moebench.results import RunSummary, new_run_id
from moebench.runner import die_with_parent, flag_busy, progress_bar
from moebench.spec import Case

STARTUP_TIMEOUT_S = 300   # torchrun + imports + process-group init, until rank 0 starts the first case
POLL_S = 0.02
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class LaunchError(OSError):
    """The workers cannot be started as asked (e.g. more processes than GPUs)."""


@dataclass(frozen=True)
class Nodes:
    """A launch over several nodes: this launcher is node `node_rank` of `nnodes`; torchrun's c10d rendezvous is at
    `endpoint` (HOST:PORT, the same on every node). Node 0 leads (plan, timeouts, results); the others follow."""
    nnodes: int
    node_rank: int
    endpoint: str

    @property
    def lead(self) -> bool:
        return self.node_rank == 0


def nodes_from_options(nnodes: int, node_rank: int | None, endpoint: str | None) -> Nodes | None:
    """The --nnodes / --node-rank / --rdzv-endpoint options as a Nodes (None: one node), or ValueError naming the
    option and its valid values."""
    if nnodes < 1:
        raise ValueError(f"--nnodes must be >= 1; got {nnodes}")
    if nnodes == 1:
        given = [o for o, v in (("--node-rank", node_rank), ("--rdzv-endpoint", endpoint)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: for a multi-node launch; give --nnodes N (N >= 2) as well, "
                             f"or leave {'them' if len(given) > 1 else 'it'} out for one node")
        return None
    if endpoint is None:
        raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: an address of node 0 that every node "
                         f"reaches and a free port, the same on every node (e.g. node0:29500)")
    if node_rank is None:
        raise ValueError(f"--nnodes {nnodes} needs --node-rank R: 0 on the node that writes the results, "
                         f"1..{nnodes - 1} on the others")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}; got {node_rank}")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT with a port in 1..65535 (e.g. node0:29500); "
                         f"got '{endpoint}'")
    return Nodes(nnodes, node_rank, endpoint)


# ============================================================================================ launcher side
def why_not(case: Case, nproc: int, nnodes: int = 1) -> str | None:
    """Reasons a case cannot run in this launch (nnodes x nproc processes), decided before starting anything."""
    R = case.workload.world_size
    backend = get(case.backend)
    if R > nproc * nnodes:
        return f"needs {R} processes; this run has --nproc {nproc}" + (
            f" on each of --nnodes {nnodes} ({nproc * nnodes} in all)" if nnodes > 1 else "")
    if R > 1 and not backend.needs_process_group:
        return f"{case.backend} runs in one process; ranks={R} needs a process-group backend (e.g. ep)"
    if backend.needs_process_group:
        if case.workload.level != "layer":
            return f"{case.backend} is measured at level 'layer' only (a model-level step would also need " \
                   f"data-parallel gradient all-reduce for the dense weights)"
        if case.model.n_experts % R:
            return f"n_experts ({case.model.n_experts}) is not divisible by ranks ({R})"
    return None


def run(cases: list[Case], out, *, nproc: int, resume: bool = False, run_id: str | None = None, console=None,
        progress: bool = True, wait: bool = True, nodes: Nodes | None = None) -> RunSummary:
    if nodes is not None and not nodes.lead:
        return follow(cases, Path(out), nproc=nproc, nodes=nodes, console=console, wait=wait)
    nnodes = nodes.nnodes if nodes else 1
    out = results.check_writable(out)
    run_id = run_id or new_run_id()
    summary = RunSummary(out=out, run_id=run_id)
    pool: list[dict] = []  # ok records scaling efficiency may use as baselines
    if resume:
        done, problems = results.done_keys(out)
        summary.warnings += [f"warning: {p}" for p in problems]
        pool = [r for r in results.read(out).records if r["status"] == "ok"] if out.stat().st_size else []
        todo = [c for c in cases if c.key not in done]
        summary.skipped_done = len(cases) - len(todo)
    else:
        todo = list(cases)
    todo.sort(key=lambda c: c.workload.world_size)  # 1-rank baselines first
    if any(c.device == "cuda" for c in todo) and torch.cuda.device_count() < nproc:
        raise LaunchError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}")

    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    for w in summary.warnings:
        console.print(f"[yellow]{escape(w)}[/]")
    bar = progress_bar(console, progress)
    log_path = out.with_suffix(out.suffix + ".log")
    workdir = Path(tempfile.mkdtemp(prefix="moebench-ep-"))

    lock = DeviceLock(todo[0].device if todo else "cpu", nproc, wait=wait,
                      on_wait=lambda m: console.print(f"[yellow]{escape(m)}[/]"))

    def finish(rec):
        flag_busy(rec, lock.busy)
        if rec["status"] == "ok" and rec["case"]["workload"].get("ranks"):
            rec["metrics"]["scaling"] = scaling(rec, pool)
        results.append(out, rec)
        summary.records.append(rec)
        if rec["status"] == "ok":
            pool.append(rec)
        console.print(cons.line(rec))
        bar.advance(task)

    launch = None
    try:
        with bar, lock:
            task = bar.add_task("starting", total=len(todo))
            runnable = []
            for c in todo:
                reason = why_not(c, nproc, nnodes)
                if reason:
                    finish(results.make_record(c, "skipped", run_id=run_id, env=envinfo.parent(c.device), reason=reason))
                else:
                    runnable.append(c)
            i, n_launch = 0, 0
            while i < len(runnable):
                n_launch += 1
                launch = _Launch(runnable[i:], nproc, run_id, workdir / f"launch{n_launch}", log_path, nodes=nodes,
                                 attempt=n_launch)
                for j, case in enumerate(runnable[i:]):
                    bar.update(task, description=escape(case.label[:90]))
                    rec = launch.wait(j, case)
                    finish(rec)
                    i += 1
                    if launch.dead:
                        break
                if launch.dead and launch.never_started:  # the workers cannot start: retrying will not help
                    for case in runnable[i:]:
                        finish(results.make_record(case, "failed", run_id=run_id, env=envinfo.parent(case.device),
                                                   reason=f"not run: {launch.never_started}"))
                    i = len(runnable)
                launch.close()
                launch = None
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if launch is not None:
            launch.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    if summary.records and any(r["case"]["workload"].get("ranks") for r in summary.records):
        console.print(scaling_table(summary.records))
    return summary


def follow(cases: list[Case], out: Path, *, nproc: int, nodes: Nodes, console=None, wait: bool = True) -> RunSummary:
    """A node other than 0: run this node's workers in each of the lead's launches until its plan is done. The
    workers take the plan from the lead (rank 0) through the rendezvous store; nothing is recorded here. A launch
    that ends before the lead's last case started (a fault: the lead kills its launch and starts a new one with the
    remaining cases) is followed by the next; one that never received a plan (no lead came) ends the run."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    summary = RunSummary(out=out, run_id="")
    log_path = out.with_suffix(out.suffix + f".node{nodes.node_rank}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"moebench-ep-node{nodes.node_rank}-"))
    pg_timeout_s = max([c.timeout_s for c in cases] or [0]) + 120
    lock = DeviceLock(cases[0].device if cases else "cpu", nproc, wait=wait,
                      on_wait=lambda m: console.print(f"[yellow]{escape(m)}[/]"))
    attempt, launch = 0, None
    try:
        with lock:
            while True:
                attempt += 1
                console.print(f"node {nodes.node_rank} of {nodes.nnodes}: launch {attempt}, joining the rendezvous at "
                              f"{escape(nodes.endpoint)} (log: {escape(str(log_path))})")
                launch = _Launch(None, nproc, "", workdir / f"launch{attempt}", log_path, nodes=nodes,
                                 attempt=attempt, pg_timeout_s=pg_timeout_s)
                code = launch.proc.wait()
                launch.close()
                launch = None
                d = workdir / f"launch{attempt}"
                if (d / "finished").exists():
                    console.print(f"node {nodes.node_rank}: the lead's plan is done; its records are in the "
                                  f"results file on node 0")
                    break
                progress = _progress(d)
                if progress is None:
                    summary.warnings.append(f"node {nodes.node_rank}: launch {attempt} ended (torchrun exit code "
                                            f"{code}) before a plan came from node 0; see {log_path}")
                    console.print(f"[yellow]{escape(summary.warnings[-1])}[/]")
                    break
                j, n = progress
                if j >= n - 1:  # the lead has no case left to relaunch
                    console.print(f"node {nodes.node_rank}: the lead's last case ended with a fault; done")
                    break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if launch is not None:
            launch.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


def _progress(d: Path) -> tuple[int, int] | None:
    """(the last case index a worker of this node started, the plan's length), or None before any plan came."""
    best = None
    for f in d.glob("rank*.progress"):
        try:
            j, n = map(int, f.read_text().split())
        except ValueError:
            continue
        best = (j, n) if best is None or j > best[0] else best
    return best


class _Launch:
    """One torchrun process tree running `cases` from the first; `wait(j, case)` returns case j's record. cases None:
    a follower node's workers, which take the lead's plan from the rendezvous store."""

    def __init__(self, cases: list[Case] | None, nproc: int, run_id: str, d: Path, log_path: Path, *,
                 nodes: Nodes | None = None, attempt: int = 1, pg_timeout_s: float | None = None):
        d.mkdir(parents=True)
        self.d, self.run_id, self.dead, self.never_started = d, run_id, False, ""
        plan = {"run_id": run_id, "dir": str(d),
                "cases": None if cases is None else [c.model_dump(mode="json") for c in cases],
                "pg_timeout_s": pg_timeout_s or max(c.timeout_s for c in cases) + 120}
        (d / "plan.json").write_text(json.dumps(plan))
        env = dict(os.environ)
        for k, v in NCCL_ENV.items():  # NVLink multicast off (required on the lead's machines; harmless elsewhere)
            env.setdefault(k, v)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        if nodes is None:
            where = ["--standalone"]
        else:
            env |= {"MOEBENCH_NODE_RANK": str(nodes.node_rank), "MOEBENCH_NNODES": str(nodes.nnodes)}
            where = [f"--nnodes={nodes.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.endpoint}",
                     f"--rdzv-id=moebench-{attempt}", f"--rdzv-conf=join_timeout={STARTUP_TIMEOUT_S}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
               "-m", "moebench.distributed", str(d / "plan.json")]
        self.log = open(log_path, "ab")  # noqa: SIM115 - torchrun writes to it until close()
        self.log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.log_path = log_path

    def wait(self, j: int, case: Case) -> dict:
        def rec(status, reason, m=None):
            return results.make_record(case, status, run_id=self.run_id, env=envinfo.parent(case.device), reason=reason,
                                       metrics=m)

        started, since = None, (self.t0 if j == 0 else time.monotonic())
        while True:
            if (self.d / f"{j}.json").exists():
                return json.loads((self.d / f"{j}.json").read_text())
            errs = sorted(self.d.glob(f"{j}.rank*.err"))
            if errs or self.proc.poll() is not None:
                self._settle()
                errs = sorted(self.d.glob(f"{j}.rank*.err"))
                self.kill()
                if (self.d / f"{j}.json").exists():  # finished just before torchrun exited
                    return json.loads((self.d / f"{j}.json").read_text())
                if errs:
                    return self._failed(errs, rec)
                code = self.proc.returncode
                if j == 0 and not (self.d / f"{j}.start").exists():
                    self.never_started = f"torchrun exited with code {code} before any case started; " + self._tail()
                    return rec("failed", self.never_started)
                return rec("failed", f"torchrun exited with code {code} during the case, no rank reported an "
                                     f"error; {self._tail()}")
            if started is None and (self.d / f"{j}.start").exists():
                started = time.monotonic()
            now = time.monotonic()
            if started is None and now - since > STARTUP_TIMEOUT_S:
                self.kill()
                if j == 0:
                    self.never_started = f"the workers did not start within {STARTUP_TIMEOUT_S} s; {self._tail()}"
                return rec("timeout", f"rank 0 did not start the case within {STARTUP_TIMEOUT_S} s; {self._tail()}")
            if started is not None and now - started > case.timeout_s:
                states = self._states(dump_stacks=True)
                self.kill()
                return rec("timeout", f"no result after {case.timeout_s:.0f} s; {states}; process tree killed")
            time.sleep(POLL_S)

    def _settle(self, grace_s: float = 5.0) -> None:
        """A rank failed: give torchrun a moment to stop the others (they may report their own errors)."""
        end = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < end:
            time.sleep(POLL_S)

    def _failed(self, errs: list[Path], rec) -> dict:
        reports = sorted((json.loads(p.read_text()) for p in errs), key=lambda e: e["time"])
        first = reports[0]
        reason = f"rank {first['rank']}: {first['reason']}"
        for e in reports[1:]:
            reason += f"; then rank {e['rank']}: {e['reason']}"
        return rec(first["status"], reason, {"failed_ranks": [e["rank"] for e in reports],
                                             "traceback": first.get("traceback", "")})

    def _states(self, dump_stacks: bool = False) -> str:
        """What each rank is doing: its last phase and, with dump_stacks, the innermost frame of its Python stack
        (SIGUSR1 -> faulthandler in the worker), e.g. a rank stuck in its own code vs one waiting in a collective."""
        if dump_stacks:
            for pid_file in self.d.glob("rank*.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGUSR1)
                except (ProcessLookupError, PermissionError, ValueError):
                    pass
            time.sleep(1.0)
        out = []
        for st in sorted(self.d.glob("rank*.state")):
            where = _innermost_frame(self.d / f"{st.stem}.stack") if dump_stacks else ""
            out.append(f"{st.stem}: {st.read_text().strip()}" + (f", at {where}" if where else ""))
        return "; ".join(out) or "no rank reported a state"

    def _tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return f"last lines of {self.log_path}: " + " | ".join(ln.strip()[:300] for ln in lines[-n:])

    def kill(self) -> None:
        """SIGKILL torchrun and everything it started. torchrun puts each worker in its own session, so each
        worker's process group goes too (it holds anything the worker started). Only live processes known to be
        this launch's are signalled: torchrun while not reaped, its descendants in /proc, and workers whose command
        line names this launch's plan (their pid files outlive them)."""
        if self.dead:
            return
        ours = set()
        if self.proc.poll() is None:
            ours |= {self.proc.pid, *_descendants(self.proc.pid)}
        plan = str(self.d / "plan.json")
        for f in self.d.glob("rank*.pid"):
            pid = int(f.read_text()) if f.read_text().strip().isdigit() else 0
            if pid and plan in _cmdline(pid):
                ours.add(pid)
        for pid in ours:
            for fn in (os.killpg, os.kill):
                try:
                    fn(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.dead = True

    def close(self) -> None:
        """After the last case: torchrun exits once its workers have; kill only what is left after 30 s."""
        if not self.dead:
            try:
                self.proc.wait(30)
                self.dead = True
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def _innermost_frame(path: Path) -> str:
    """From a faulthandler dump: 'file:line in function' of the innermost frame of the thread that took the signal."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), 0)
    for ln in lines[start:]:
        ln = ln.strip()
        if ln.startswith("File "):  # File "/x/y.py", line 12 in fn
            file, _, rest = ln[6:].partition('", line ')
            return f"{Path(file).name}:{rest}"
    return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


# ---------------------------------------------------------------------------------------------- scaling
def _like(rec: dict, backend: str | None = None, options: dict | None = None) -> str:
    """What must match between an R-rank case and its 1-rank baseline: all but batch, ranks, warmup, repeats."""
    c = rec["case"]
    w = {k: v for k, v in c["workload"].items() if k not in ("batch", "ranks", "warmup", "repeats")}
    w.setdefault("gemm_dtype", "default")  # records from before the field: the default
    return json.dumps([c["model"], backend or c["backend"], c["backend_options"] if options is None else options, w],
                      sort_keys=True)


def scaling(rec: dict, pool: list[dict]) -> dict:
    """Weak and strong scaling efficiency of an R-rank ok record against 1-rank ok records in `pool`."""
    c, w = rec["case"], rec["case"]["workload"]
    R = w.get("ranks") or 1
    tps = rec["metrics"]["tokens_per_s"]["p50"]
    ones = [b for b in pool if b["status"] == "ok" and not b["case"]["workload"].get("ranks")]
    local = c["backend_options"].get("local", get(c["backend"]).options.get("local"))
    targets = [("", _like(rec))] + ([("_local", _like(rec, local, {}))] if local else [])
    out = {}
    for suffix, like in targets:
        for kind, batch in (("weak", w["batch"]), ("strong", w["batch"] * R)):
            base = [b for b in ones if b["case"]["workload"]["batch"] == batch and _like(b) == like]
            if not base:
                if not suffix:
                    out[kind] = {"efficiency": None, "reason": f"no ok 1-rank case with batch {batch} to compare with"}
                continue
            b = base[-1]
            b_tps = b["metrics"]["tokens_per_s"]["p50"]
            out[kind + suffix] = {"efficiency": tps / (R * b_tps), "baseline_case_key": b["case_key"],
                                  "baseline_backend": b["case"]["backend"], "baseline_batch": batch,
                                  "baseline_tokens_per_s": b_tps, "baseline_run_id": b["run_id"]}
    out["vs_best_one_gpu"] = epscaling.best_one_gpu(rec, pool)
    return out


def scaling_table(records: list[dict]):
    from rich.table import Table

    t = Table(title="expert parallel: tokens/s, all-to-all share, scaling efficiency vs 1 rank, speed-up over the "
                    "best one-GPU record")
    for col in ("model", "backend", "exec", "ranks", "tokens/rank", "tokens/s", "a2a share", "weak eff", "strong eff",
                "vs best 1-GPU"):
        t.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in records:
        c, m = r["case"], r.get("metrics") or {}
        if r["status"] != "ok":
            continue
        sc = m.get("scaling", {})
        eff = lambda k: f"{sc[k]['efficiency']:.1%}" if sc.get(k, {}).get("efficiency") is not None else ""  # noqa
        opts = "".join(f",{k}={v}" for k, v in sorted(c["backend_options"].items()))
        ep_m = m.get("ep", {})
        share = ep_m.get("a2a_share")
        best = sc.get("vs_best_one_gpu") or {}
        vs = f"{best['speedup']:.2f}x ({best['baseline_backend']} {best['baseline_exec']})" \
            if best.get("speedup") is not None else ""
        t.add_row(c["model"]["name"], c["backend"] + opts, c["workload"].get("exec", "eager"),
                  str(c["workload"].get("ranks") or 1),
                  f"{c['workload']['batch'] * c['workload']['seq']:,}", f"{m['tokens_per_s']['p50']:,.0f}",
                  f"{share:.1%}" if share is not None else "", eff("weak"), eff("strong"), vs)
    return t


# ============================================================================================== rank side
_STATE: tuple[Path, int, int] | None = None  # (launch dir, rank, case index) while a worker runs a case


def _phase(text: str) -> None:
    if _STATE is not None:
        d, rank, j = _STATE
        (d / f"rank{rank}.state").write_text(f"case {j}: {text}\n")


def _group():
    import torch.distributed as dist

    from implementations import ep
    g = ep.current_group()
    return g, dist.get_world_size(g), dist.get_rank(g)


def parity(case: Case) -> dict:
    """core.parity on this rank's rows of the global batch; every rank's errors gathered, the worst kept."""
    import torch.distributed as dist

    _phase("parity")
    group, R, r = _group()
    par = core.parity(case, ranks=R, rank=r)
    per_rank = [None] * R
    dist.all_gather_object(per_rank, par["errors"], group=group)
    worst = {k: max(e[k] for e in per_rank) for k in par["errors"]}
    return par | {"ok": all(e <= par["tol"] for e in worst.values()), "errors": worst, "errors_per_rank": per_rank}


def _agree(device: torch.device, group):
    """Combine a flag over the case's ranks ("any": MAX, "all": MIN), so every rank runs as many steps."""
    import torch.distributed as dist

    def agree(flag: bool, how: str) -> bool:
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "any" else dist.ReduceOp.MIN, group=group)
        return bool(t.item())
    return agree


def measure(case: Case, device: torch.device) -> dict:
    """core's step on every rank of the case (this rank's own tokens and routing), warm-up and timed blocks agreed
    over the ranks; exchange spans recorded without syncs and read after the timing; rank 0 gathers every rank's
    numbers and returns the merged metrics."""
    import torch.distributed as dist

    from implementations import ep
    group, R, r = _group()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flush = core.l2_flush(case, device)
    core.reset_compiler()
    step = core.build_step(case, device, rank=r, built=lambda: core.reset_peak(device))
    agree = _agree(device, group)
    with ep.recording(device) as rec:
        _phase("measure: warm-up")
        n_warm, est_s = core.warm_up(step, case.workload.warmup, device, agree=agree)
        est = torch.tensor([est_s], device=device)
        dist.all_reduce(est, op=dist.ReduceOp.MAX, group=group)  # one block size on every rank
        _phase("measure: timed steps")
        t = core.time_precise(step, device, first=n_warm, est_s=float(est.item()), min_steps=case.workload.repeats,
                              precision=case.precision, max_time_s=case.max_time_s, flush=flush,
                              before=lambda k: setattr(rec, "step", k), agree=agree)
        rec.step = -1
        spans = rec.read()
        rows = [x for x in rec.rows if x[0] >= 0]
        sent = rec.bytes
    n = len(t.step_ms)
    a2a_ms = [0.0] * n
    kinds: dict[str, list[float]] = {}
    for s, kind, ms in spans:
        if 0 <= s < n:
            a2a_ms[s] += ms
            kinds.setdefault(kind, [0.0] * n)[s] += ms
    bytes_by_kind: dict[str, list[float]] = {}
    for s, kind, b in sent:
        if 0 <= s < n:
            bytes_by_kind.setdefault(kind, [0.0] * n)[s] += b
    nbytes = flush.numel() * flush.element_size() if flush is not None else 0
    mine = {"rank": r, "tokens": case.workload.tokens, "step_ms": t.step_ms, "warmup_steps": n_warm,
            "a2a_ms": a2a_ms, "a2a_ms_by_kind": kinds,
            "bytes_by_kind": {k: float(np.median(v)) for k, v in bytes_by_kind.items()},
            "rows_received_padded": float(np.mean([x[4] for x in rows])) if rows else 0.0,
            "rows_received": float(np.mean([x[1] for x in rows])) if rows else 0.0,
            "rows_sent_remote": float(np.mean([x[2] for x in rows])) if rows else 0.0,
            "rows_received_remote": float(np.mean([x[3] for x in rows])) if rows else 0.0,
            "counts": [step.routes_of(o)[0].tolist() for o in t.outs]} | core.memory(device, nbytes)
    _phase("gather")
    gathered = [None] * R if r == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=group)
    return _merge(case, gathered, device, step, t) if r == 0 else {"rank": r}


def _merge(case: Case, per: list[dict], device: torch.device, step, t) -> dict:
    """Rank 0: one record's metrics from every rank's numbers. A step ends when its slowest rank ends."""
    w, spec = case.workload, case.model
    R, T = len(per), w.tokens
    step_ms = [max(p["step_ms"][i] for p in per) for i in range(len(t.step_ms))]
    m = core.timing_metrics(case, step, t, per[0]["warmup_steps"], device, ranks=R, step_ms=step_ms)
    # eager only: a replayed graph runs no host code (no span, byte or row count per exchange), and under compile the
    # recorder's host code is traced by dynamo, untested so far: neither is reported as a measurement
    timed = w.exec == "eager"
    if not timed:  # unmeasured is None, never a 0 that reads as a measurement
        per = [p | {k: None for k in ("rows_received", "rows_sent_remote", "rows_received_remote")}
               | {"bytes_by_kind": {}, "rows_received_padded": None} for p in per]
    share = [float(np.median([a / s for a, s in zip(p["a2a_ms"], p["step_ms"])])) if timed else None for p in per]
    per_rank = [{"rank": p["rank"], "tokens": p["tokens"], "step_ms": metrics.quantiles(p["step_ms"]),
                 "a2a_ms": metrics.quantiles(p["a2a_ms"]) if timed else None, "a2a_share": s,
                 "a2a_ms_by_kind": {k: float(np.median(v)) for k, v in p["a2a_ms_by_kind"].items()},
                 "bytes_by_kind": p["bytes_by_kind"],
                 "gbps_by_kind": {k: b / ms * 1e-6 for k, b in p["bytes_by_kind"].items()
                                  if (ms := float(np.median(p["a2a_ms_by_kind"].get(k, [0.0])))) > 0},
                 "padding_frac": None if not timed else 1 - p["rows_received"] / p["rows_received_padded"]
                 if p["rows_received_padded"] else 0.0,
                 "rows_received": p["rows_received"], "rows_sent_remote": p["rows_sent_remote"],
                 "rows_received_remote": p["rows_received_remote"], "memory": p["memory"]}
                for p, s in zip(per, share)]
    kinds_b = sorted({k for pr in per_rank for k in pr["bytes_by_kind"]})
    kinds_g = sorted({k for pr in per_rank for k in pr["gbps_by_kind"]})
    remote_bytes = np.mean([p["rows_sent_remote"] for p in per]) * spec.d_model * torch.empty((), dtype=getattr(
        torch, w.dtype)).element_size() if timed else None
    m["ep"] = {
        "ranks": R, "tokens_per_rank": T, "tokens_global": R * T, "warmup_steps": per[0]["warmup_steps"],
        "a2a_share": float(np.mean(share)) if timed else None,
        "a2a_ms": float(np.mean([pr["a2a_ms"]["p50"] for pr in per_rank])) if timed else None,
        "bytes_by_kind": {k: float(np.mean([pr["bytes_by_kind"].get(k, 0.0) for pr in per_rank])) for k in kinds_b},
        "a2a_bytes_per_step": float(np.mean([sum(pr["bytes_by_kind"].values()) for pr in per_rank]))
        if timed else None,
        "gbps_by_kind": {k: float(np.mean([pr["gbps_by_kind"][k] for pr in per_rank if k in pr["gbps_by_kind"]]))
                         for k in kinds_g},
        "padding_frac": float(np.mean([pr["padding_frac"] for pr in per_rank])) if timed else None,
        "a2a_ms_by_kind": {k: float(np.mean([pr["a2a_ms_by_kind"].get(k, 0.0) for pr in per_rank]))
                           for k in per_rank[0]["a2a_ms_by_kind"]},
        "remote_row_bytes_per_exchange": float(remote_bytes) if timed else None,
        "per_rank": per_rank,
        "definitions": "step time = the slowest rank's, per step; tokens/s over all ranks' tokens; a2a = the "
                       "exchange time the rank's stream is exposed to: counts exchange (with its host sync) + "
                       "dispatch + combine, forward and backward, each whole (ep, ep-dedup, ep-padded), or only the "
                       "waits for them (ep-pipelined: what the pipeline did not hide), timed on each rank's stream; "
                       "a2a_share = median over steps of a2a / step time, averaged over ranks; "
                       "rows = one per routed slot (ep, ep-padded, ep-pipelined) or per (token, rank) pair "
                       "(ep-dedup), real rows "
                       "only; bytes_by_kind = bytes a rank sends to other ranks per step in each exchange (padding "
                       "included: what the wire carries), averaged over ranks; gbps_by_kind = those bytes / that "
                       "exchange's median span on the rank (1e9 B/s), averaged over ranks; padding_frac = padding "
                       "rows / rows a rank receives (ep-padded, ep-pipelined); mfu against R x the one-GPU ceiling"
                       + ("" if timed else "; under exec graphs no exchange is timed or counted (replays run no "
                          "host code): a2a_* are None, bytes empty"),
    }
    peak_key = "peak_allocated_gib" if device.type == "cuda" else "peak_rss_gib"
    m["memory"] = dict(max((p["memory"] for p in per), key=lambda mm: mm.get(peak_key, 0.0)))
    m["memory"]["note"] = "the largest rank's; per rank in ep.per_rank (each holds the full replicated weights)"
    if os.environ.get("MOEBENCH_PROFILE_DIR"):
        m["profile"] = "not taken: --profile covers single-process cases only"
    counts_SLE = [[np.sum([p["counts"][i] for p in per], axis=0).tolist()] for i in range(len(per[0]["counts"]))]
    m["balance"] = metrics.balance_block(counts_SLE)  # the global load: every rank's router counts summed
    return m


def worker(plan_path: str) -> None:
    """One torchrun worker: init the process group, walk the plan's cases (the lead's, from the store on a follower
    node), exit."""
    global _STATE
    import torch.distributed as dist

    from implementations import ep
    die_with_parent()
    plan = json.loads(Path(plan_path).read_text())
    d = Path(plan["dir"])
    rank, world, store = _rank_and_store(timedelta(seconds=plan["pg_timeout_s"]))
    (d / f"rank{rank}.pid").write_text(str(os.getpid()))
    stack_file = open(d / f"rank{rank}.stack", "w")  # noqa: SIM115 - open for the process's life (faulthandler)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    if rank == 0:
        store.set("plan", json.dumps(plan))
    else:
        plan = json.loads(store.get("plan")) | {"dir": str(d)}
    cases = [Case.model_validate(c) for c in plan["cases"]]
    cuda = any(c.device == "cuda" for c in cases)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=plan["pg_timeout_s"]))
    sizes = sorted({c.workload.world_size for c in cases if c.workload.world_size <= world})
    groups = {n: dist.group.WORLD if n == world else dist.new_group(list(range(n))) for n in sizes}
    device = "cuda" if cuda else "cpu"
    env = (envinfo.collect(device) if rank == 0 else envinfo.static()) | {"ranks_launched": world}
    if world > int(os.environ["LOCAL_WORLD_SIZE"]):
        env["nodes_launched"] = world // int(os.environ["LOCAL_WORLD_SIZE"])
        if rank == 0:  # the other nodes' errors reach the lead's launcher through this rank
            threading.Thread(target=_mirror_errors, args=(d, world), daemon=True).start()
    for j, case in enumerate(cases):
        R = case.workload.world_size
        _STATE = (d, rank, j)
        (d / f"rank{rank}.progress").write_text(f"{j} {len(cases)}\n")
        if rank == 0:
            (d / f"{j}.start").touch()
        if rank < R:
            _phase("running")
            print(f"--- rank {rank} case {j} {case.key} {case.label}", flush=True)
            problem = _local_problem(case)  # alike on every rank: recorded, nobody exits
            if problem:
                rec = results.make_record(case, problem[0], run_id=plan["run_id"], env=env, reason=problem[1])
            else:
                fns = {"parity_fn": parity, "measure_fn": measure} if get(case.backend).needs_process_group else {}
                with ep.use_group(groups[R]):
                    rec = harness.run_case(case, plan["run_id"], env, **fns)
            if not problem and rec["status"] in ("failed", "oom") and R > 1:  # peers may wait for it in a collective
                err = {"rank": rank, "status": rec["status"], "reason": rec["reason"], "time": time.time(),
                       "traceback": rec["metrics"].get("traceback", "")}
                _write_json(d / f"{j}.rank{rank}.err", err)
                store.set(f"err{j}.rank{rank}", json.dumps(err, default=str))
                if rank == 0 and world > int(os.environ["LOCAL_WORLD_SIZE"]):
                    _last_errors(store, d, j, world)  # a peer's error may be the cause of this one: bring it along
                print(rec["metrics"].get("traceback", rec["reason"]), flush=True)
                sys.stderr.flush()
                os._exit(1)
            if rank == 0:
                _write_json(d / f"{j}.json", rec)
                store.set(f"done{j}", "1")
        _phase("waiting for the case's record")
        if rank:  # ranks leave a case together; non-members idle here
            store.wait([f"done{j}"])
    _STATE = None
    (d / "finished").touch()
    dist.destroy_process_group()


def _rank_and_store(timeout: timedelta):
    """(this worker's rank, the world size, a client of torchrun's rendezvous store under prefix 'moebench').
    Rank = node rank x workers per node + local rank, so rank 0 is on node 0 whatever order torchrun's c10d
    rendezvous gave the nodes. Two nodes given the same --node-rank, or nodes launched with different --nproc,
    stop here with a message saying so (in the launch log)."""
    import torch.distributed as dist

    node, nnodes = int(os.environ.get("MOEBENCH_NODE_RANK", "0")), int(os.environ.get("MOEBENCH_NNODES", "1"))
    n_local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    rank = node * n_local + int(os.environ["LOCAL_RANK"])
    store = dist.PrefixStore("moebench", dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                       is_master=False, timeout=timeout))
    if world != nnodes * n_local:
        sys.exit(f"moebench: {world} workers joined but --nnodes {nnodes} x --nproc {n_local} is "
                 f"{nnodes * n_local}: give every node the same --nproc")
    if store.add(f"rank{rank}", 1) > 1:
        sys.exit(f"moebench: two nodes were given --node-rank {node}: each node needs its own, 0..{nnodes - 1}")
    return rank, world, store


def _mirror_errors(d: Path, world: int) -> None:
    """Rank 0 (a daemon thread, its own store client): copy the errors other nodes' ranks put in the store into the
    lead's launch directory, where the launcher reads them as <i>.rank<r>.err."""
    import torch.distributed as dist

    store = dist.PrefixStore("moebench", dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                       is_master=False))
    seen: set[str] = set()
    while _STATE is None or _copy_errors(store, d, _STATE[2], world, seen) is not None:
        time.sleep(0.2)


def _last_errors(store, d: Path, j: int, world: int, grace_s: float = 2.0) -> None:
    """Rank 0 is about to exit over case j: wait up to grace_s for other nodes' errors and copy them, so the record
    names the rank that failed first, not only rank 0's broken collective."""
    end, seen = time.monotonic() + grace_s, set()
    while time.monotonic() < end:
        n = _copy_errors(store, d, j, world, seen)
        if n is None or seen:
            return
        time.sleep(0.05)


def _copy_errors(store, d: Path, j: int, world: int, seen: set[str]) -> int | None:
    """Copy case j's errors of ranks 1.. from the store into d; how many are new, or None once the store is gone
    (its host, a torchrun agent, ends with its workers)."""
    n = 0
    try:
        for r in range(1, world):
            key = f"err{j}.rank{r}"
            if key not in seen and store.check([key]):
                seen.add(key)
                _write_json(d / f"{j}.rank{r}.err", json.loads(store.get(key)))
                n += 1
    except (RuntimeError, OSError, ValueError):  # DistStoreError is a RuntimeError
        return None
    return n


def _local_problem(case: Case) -> tuple[str, str] | None:
    """(status, reason) when an expert-parallel case's `local` backend is unknown (failed) or cannot run here
    (skipped). Decided alike on every rank before any collective, so no rank has to exit over it."""
    from implementations import ep
    backend = get(case.backend)
    local = {**backend.options, **case.backend_options}.get("local")
    if not backend.needs_process_group or local is None:
        return None
    try:
        ep._local_backend(local, case.device, case.workload.dtype)
    except ValueError as e:
        return "failed", str(e)
    except RuntimeError as e:
        return "skipped", str(e)
    return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":  # run from the imported module, whose globals (_STATE) the harness's calls see
    from moebench import distributed  # noqa: PLW0406
    distributed.worker(sys.argv[1])
