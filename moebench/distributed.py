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

Scaling efficiency of an R-rank case = its tokens/s / (R x tokens/s of the 1-rank case it is compared with):
weak = the 1-rank case with the same per-rank batch, strong = the one with the same global batch (batch x R).
Both use the same backend and options; `weak_local` / `strong_local` compare with the local backend alone
(e.g. grouped_mm with no exchange at all) when the suite has it.
"""
from __future__ import annotations

import faulthandler
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from moebench import metrics, results
from moebench.registry import get
from moebench.runner import RunSummary, _line, _parent_env, new_run_id
from moebench.spec import Case

STARTUP_TIMEOUT_S = 300   # torchrun + imports + process-group init, until rank 0 starts the first case
POLL_S = 0.02
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class LaunchError(OSError):
    """The workers cannot be started as asked (e.g. more processes than GPUs)."""


# ============================================================================================ launcher side
def why_not(case: Case, nproc: int) -> str | None:
    """Reasons a case cannot run in this launch, decided before starting anything."""
    R = case.workload.world_size
    backend = get(case.backend)
    if R > nproc:
        return f"needs {R} processes; this run has --nproc {nproc}"
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
        progress: bool = True) -> RunSummary:
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    for w in summary.warnings:
        console.print(f"[yellow]{w}[/]")
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    log_path = out.with_suffix(out.suffix + ".log")
    workdir = Path(tempfile.mkdtemp(prefix="moebench-ep-"))

    def finish(rec):
        if rec["status"] == "ok" and rec["case"]["workload"].get("ranks"):
            rec["metrics"]["scaling"] = scaling(rec, pool)
        results.append(out, rec)
        summary.records.append(rec)
        if rec["status"] == "ok":
            pool.append(rec)
        console.print(_line(rec | {"reason": escape(rec["reason"])}))  # gloo errors carry "[/path:line]"
        bar.advance(task)

    launch = None
    try:
        with bar:
            task = bar.add_task("starting", total=len(todo))
            runnable = []
            for c in todo:
                reason = why_not(c, nproc)
                if reason:
                    finish(results.make_record(c, "skipped", run_id=run_id, env=_parent_env(c.device), reason=reason))
                else:
                    runnable.append(c)
            i, n_launch = 0, 0
            while i < len(runnable):
                n_launch += 1
                launch = _Launch(runnable[i:], nproc, run_id, workdir / f"launch{n_launch}", log_path)
                for j, case in enumerate(runnable[i:]):
                    bar.update(task, description=case.label[:90])
                    rec = launch.wait(j, case)
                    finish(rec)
                    i += 1
                    if launch.dead:
                        break
                if launch.dead and launch.never_started:  # the workers cannot start: retrying will not help
                    for case in runnable[i:]:
                        finish(results.make_record(case, "failed", run_id=run_id, env=_parent_env(case.device),
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


class _Launch:
    """One torchrun process tree running `cases` from the first; `wait(j, case)` returns case j's record."""

    def __init__(self, cases: list[Case], nproc: int, run_id: str, d: Path, log_path: Path):
        d.mkdir(parents=True)
        self.d, self.run_id, self.dead, self.never_started = d, run_id, False, ""
        plan = {"run_id": run_id, "dir": str(d), "cases": [c.model_dump(mode="json") for c in cases],
                "pg_timeout_s": max(c.timeout_s for c in cases) + 120}
        (d / "plan.json").write_text(json.dumps(plan))
        env = dict(os.environ)
        for k, v in NCCL_ENV.items():  # NVLink multicast off (required on the lead's machines; harmless elsewhere)
            env.setdefault(k, v)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
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
            return results.make_record(case, status, run_id=self.run_id, env=_parent_env(case.device), reason=reason,
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
    return out


def scaling_table(records: list[dict]):
    from rich.table import Table

    t = Table(title="expert parallel: tokens/s, all-to-all share, scaling efficiency vs 1 rank")
    for col in ("model", "backend", "ranks", "tokens/rank", "tokens/s", "a2a share", "weak eff", "strong eff"):
        t.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in records:
        c, m = r["case"], r.get("metrics") or {}
        if r["status"] != "ok":
            continue
        sc = m.get("scaling", {})
        eff = lambda k: f"{sc[k]['efficiency']:.1%}" if sc.get(k, {}).get("efficiency") is not None else ""  # noqa
        opts = "".join(f",{k}={v}" for k, v in sorted(c["backend_options"].items()))
        ep_m = m.get("ep", {})
        t.add_row(c["model"]["name"], c["backend"] + opts, str(c["workload"].get("ranks") or 1),
                  f"{c['workload']['batch'] * c['workload']['seq']:,}", f"{m['tokens_per_s']['p50']:,.0f}",
                  f"{ep_m['a2a_share']:.1%}" if "a2a_share" in ep_m else "", eff("weak"), eff("strong"))
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
    """Each rank's output and gradients (x, p, and its shard of w1, w2) vs naive on the unsharded layer over the
    global batch (every rank draws the same global tensors from one seed and runs its rows); naive in higher
    precision. A weight gradient is compared whole: the reference is zero outside this rank's expert shard."""
    import torch.distributed as dist

    from moebench.harness import DTYPES, TOLERANCE, routing_for
    _phase("parity")
    group, R, r = _group()
    backend, naive = get(case.backend), get("naive")
    spec, w = case.model, case.workload
    dev, dt = torch.device(case.device), DTYPES[w.dtype]
    if dev.type == "cuda":  # this rank's GPU, for the generator as for the tensors
        dev = torch.device("cuda", torch.cuda.current_device())
    ref_dt = torch.float64 if dt == torch.float32 else torch.float32
    T, D, Fh, E, K = w.tokens, spec.d_model, spec.d_expert, spec.n_experts, spec.top_k
    g = torch.Generator(device=dev).manual_seed(w.seed + 12345)
    base = {
        "x_TD": torch.randn(R * T, D, generator=g, device=dev),
        "w1_EDF2": torch.randn(E, D, 2 * Fh, generator=g, device=dev) / math.sqrt(D),
        "w2_EFD": torch.randn(E, Fh, D, generator=g, device=dev) / math.sqrt(Fh),
        "p_TK": torch.rand(R * T, K, generator=g, device=dev) + 0.05,
    }
    idx_TK = routing_for(case, R * T, torch.Generator().manual_seed(w.seed + 54321)).to(dev)
    dy_TD = torch.randn(R * T, D, generator=g, device=dev)
    mine = slice(r * T, (r + 1) * T)

    def run(fn, dtype, rows, **opts):
        leaves = {k: (v[rows] if k in ("x_TD", "p_TK") else v).to(dtype, copy=True).requires_grad_()
                  for k, v in base.items()}
        y = fn(leaves["x_TD"], idx_TK[rows], leaves["p_TK"], leaves["w1_EDF2"], leaves["w2_EFD"], **opts)
        y.backward(dy_TD[rows].to(dtype))
        return {"y": y.detach()} | {f"d{k.split('_')[0]}": v.grad for k, v in leaves.items()}

    ref = run(naive.forward, ref_dt, slice(None))
    got = run(backend.forward, dt, mine, **{**backend.options, **case.backend_options})
    El = E // R
    errors = {}
    for k in ref:
        want = ref[k][mine] if k in ("y", "dx", "dp") else torch.zeros_like(ref[k])
        if k in ("dw1", "dw2"):
            want[r * El:(r + 1) * El] = ref[k][r * El:(r + 1) * El]
        errors[k] = metrics.rel_err(got[k] if got[k] is not None else torch.zeros_like(want), want)
    per_rank = [None] * R
    dist.all_gather_object(per_rank, errors, group=group)
    worst = {k: max(e[k] for e in per_rank) for k in errors}
    tol = TOLERANCE[w.dtype]
    return {"ok": all(e <= tol for e in worst.values()), "errors": worst, "errors_per_rank": per_rank, "tol": tol,
            "reference": f"naive in {str(ref_dt).replace('torch.', '')} on the unsharded layer, global batch "
                         f"{R} x {T} tokens", "T": T, "ranks": R}


def _layer(case: Case, backend, opts: dict, device: torch.device, dt: torch.dtype):
    """build_layer's init (randn / sqrt(fan-in) in sorted parameter order, from the workload seed) drawn on the
    device: every rank gets the same replicated weights, and a 1.4B-parameter layer does not wait on one CPU
    thread. On CPU the values equal build_layer's; on CUDA they differ (another generator), same distribution."""
    from moebench.model import MoE
    with torch.device(device):
        layer = MoE(case.model, backend, opts)
    layer.to(dt)
    g = torch.Generator(device=device).manual_seed(case.workload.seed)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters(), key=lambda kv: kv[0]):
            scale = 1.0 / math.sqrt(p.shape[-2] if p.dim() > 1 else 1)
            p.copy_(torch.randn(p.shape, generator=g, device=device) * scale)
    return layer


def measure(case: Case, device: torch.device) -> dict:
    """Layer-level timing on every rank of the case (this rank's own tokens and routing), exchange spans recorded
    without syncs and read after the loop; rank 0 gathers every rank's numbers and returns the merged metrics."""
    import torch.distributed as dist

    from implementations import ep
    from moebench.harness import DTYPES, L2_FLUSH_BYTES, _memory, timed_steps
    from moebench.routing import synthetic_idx
    group, R, r = _group()
    w, spec = case.workload, case.model
    backend = get(case.backend)
    dt = DTYPES[w.dtype]
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    layer = _layer(case, backend, {**backend.options, **case.backend_options}, device, dt)
    if w.routing != "learned":  # rank 0 draws the table a 1-process run of this workload draws
        layer.router.fixed_idx_TK = synthetic_idx(w.routing, w.tokens, spec.n_experts, spec.top_k,
                                                  seed=w.seed * 1000 + r).to(device)
    g = torch.Generator(device=device).manual_seed(w.seed + 1 + 7919 * r)
    xs = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(3)]
    dys = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(3)]
    train = w.mode == "train"
    for x in xs:
        x.requires_grad_(train)

    def step(i):
        x = xs[i % 3]
        if not train:
            with torch.no_grad():
                return layer(x)[1].counts_E
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, route = layer(x)
        y.backward(dys[i % 3])
        return route.counts_E

    flush = torch.empty(L2_FLUSH_BYTES // 4, device=device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with ep.recording(device) as rec:
        _phase("measure: warm-up")
        n_warm = _warm_up_together(step, w.warmup, device, group)
        _phase("measure: timed steps")
        step_ms, outs = timed_steps(step, n_warm, w.repeats, device, flush,
                                    before=lambda i: setattr(rec, "step", i))
        rec.step = -1
        spans = rec.read()
        rows = [x for x in rec.rows if x[0] >= 0]
    a2a_ms = [0.0] * w.repeats
    kinds: dict[str, list[float]] = {}
    for s, kind, ms in spans:
        if s >= 0:
            a2a_ms[s] += ms
            kinds.setdefault(kind, [0.0] * w.repeats)[s] += ms
    mine = {"rank": r, "tokens": w.tokens, "step_ms": step_ms, "warmup_steps": n_warm, "a2a_ms": a2a_ms,
            "a2a_ms_by_kind": kinds,
            "rows_received": float(np.mean([x[1] for x in rows])) if rows else 0.0,
            "rows_sent_remote": float(np.mean([x[2] for x in rows])) if rows else 0.0,
            "rows_received_remote": float(np.mean([x[3] for x in rows])) if rows else 0.0,
            "counts": [c.tolist() for c in outs]} | _memory(device)
    _phase("gather")
    gathered = [None] * R if r == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=group)
    return _merge(case, gathered, device) if r == 0 else {"rank": r}


def _warm_up_together(step, n: int, device: torch.device, group) -> int:
    """harness._warm_up with one count for all ranks (they meet in collectives every step): n steps and, on CUDA,
    more until WARMUP_MIN_S seconds have passed on every rank (all-reduce MAX of "not yet"), at most 200."""
    import torch.distributed as dist

    from moebench.harness import WARMUP_MIN_S
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    i = n
    while device.type == "cuda" and i < 200:
        torch.cuda.synchronize()
        more = torch.tensor([int(time.perf_counter() - t0 < WARMUP_MIN_S)], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX, group=group)
        if not more.item():
            break
        step(i)
        i += 1
    return i


def _merge(case: Case, per: list[dict], device: torch.device) -> dict:
    """Rank 0: one record's metrics from every rank's numbers. A step ends when its slowest rank ends."""
    from moebench import envinfo
    w, spec = case.workload, case.model
    R, T = len(per), w.tokens
    step_ms = [max(p["step_ms"][i] for p in per) for i in range(w.repeats)]
    flops = spec.layer_flops_per_token() * (3 if w.mode == "train" else 1)
    ceiling, sheet = envinfo.ceiling(device.type)["tflops"], metrics.datasheet_peak(envinfo.gpu_name())
    m = metrics.rates(step_ms, R * T, flops, ceiling * R, sheet * R if sheet else None)
    share = [float(np.median([a / s for a, s in zip(p["a2a_ms"], p["step_ms"])])) for p in per]
    per_rank = [{"rank": p["rank"], "tokens": p["tokens"], "step_ms": metrics.quantiles(p["step_ms"]),
                 "a2a_ms": metrics.quantiles(p["a2a_ms"]), "a2a_share": s,
                 "a2a_ms_by_kind": {k: float(np.median(v)) for k, v in p["a2a_ms_by_kind"].items()},
                 "rows_received": p["rows_received"], "rows_sent_remote": p["rows_sent_remote"],
                 "rows_received_remote": p["rows_received_remote"], "memory": p["memory"]}
                for p, s in zip(per, share)]
    remote_bytes = np.mean([p["rows_sent_remote"] for p in per]) * spec.d_model * torch.empty((), dtype=getattr(
        torch, w.dtype)).element_size()
    m["ep"] = {
        "ranks": R, "tokens_per_rank": T, "tokens_global": R * T, "warmup_steps": per[0]["warmup_steps"],
        "a2a_share": float(np.mean(share)),
        "a2a_ms": float(np.mean([pr["a2a_ms"]["p50"] for pr in per_rank])),
        "a2a_ms_by_kind": {k: float(np.mean([pr["a2a_ms_by_kind"].get(k, 0.0) for pr in per_rank]))
                           for k in per_rank[0]["a2a_ms_by_kind"]},
        "remote_row_bytes_per_exchange": float(remote_bytes),
        "per_rank": per_rank,
        "definitions": "step time = the slowest rank's, per step; tokens/s over all ranks' tokens; a2a = counts "
                       "exchange (with its host sync) + dispatch + combine, forward and backward, timed on each "
                       "rank's stream; a2a_share = median over steps of a2a / step time, averaged over ranks; "
                       "rows = one per routed slot (ep) or per (token, rank) pair (ep-dedup); "
                       "mfu against R x the one-GPU ceiling",
    }
    peak_key = "peak_allocated_gib" if device.type == "cuda" else "peak_rss_gib"
    m["memory"] = dict(max((p["memory"] for p in per), key=lambda mm: mm.get(peak_key, 0.0)))
    m["memory"]["note"] = "the largest rank's; per rank in ep.per_rank (each holds the full replicated weights)"
    if os.environ.get("MOEBENCH_PROFILE_DIR"):
        m["profile"] = "not taken: --profile covers single-process cases only"
    counts_SLE = [[np.sum([p["counts"][i] for p in per], axis=0).tolist()] for i in range(w.repeats)]
    m["balance"] = metrics.balance_block(counts_SLE)  # the global load: every rank's router counts summed
    return m


def worker(plan_path: str) -> None:
    """One torchrun worker: init the process group, walk the plan's cases, exit."""
    global _STATE
    import torch.distributed as dist

    from implementations import ep
    from moebench import envinfo, harness
    _die_with_parent()
    plan = json.loads(Path(plan_path).read_text())
    d = Path(plan["dir"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    (d / f"rank{rank}.pid").write_text(str(os.getpid()))
    stack_file = open(d / f"rank{rank}.stack", "w")  # noqa: SIM115 - open for the process's life (faulthandler)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    cases = [Case.model_validate(c) for c in plan["cases"]]
    cuda = any(c.device == "cuda" for c in cases)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=plan["pg_timeout_s"]))
    sizes = sorted({c.workload.world_size for c in cases if c.workload.world_size <= world})
    groups = {n: dist.group.WORLD if n == world else dist.new_group(list(range(n))) for n in sizes}
    device = "cuda" if cuda else "cpu"
    env = (envinfo.collect(device) if rank == 0 else envinfo.static()) | {"ranks_launched": world}
    for j, case in enumerate(cases):
        R = case.workload.world_size
        _STATE = (d, rank, j)
        if rank == 0:
            (d / f"{j}.start").touch()
        if rank < R:
            _phase("running")
            print(f"--- rank {rank} case {j} {case.key} {case.label}", flush=True)
            problem = _local_problem(case)  # alike on every rank: recorded, nobody exits
            if problem:
                rec = results.make_record(case, problem[0], run_id=plan["run_id"], env=env, reason=problem[1])
            else:
                with ep.use_group(groups[R]):
                    rec = harness.run_case(case, plan["run_id"], env)
            if not problem and rec["status"] in ("failed", "oom") and R > 1:  # peers may wait for it in a collective
                _write_json(d / f"{j}.rank{rank}.err", {"rank": rank, "status": rec["status"], "reason": rec["reason"],
                                                        "time": time.time(),
                                                        "traceback": rec["metrics"].get("traceback", "")})
                print(rec["metrics"].get("traceback", rec["reason"]), flush=True)
                sys.stderr.flush()
                os._exit(1)
            if rank == 0:
                _write_json(d / f"{j}.json", rec)
        _phase("waiting for the case's record")
        while not (d / f"{j}.json").exists():  # ranks leave a case together; non-members idle here
            time.sleep(POLL_S)
    _STATE = None
    dist.destroy_process_group()


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


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: this worker dies with its torchrun agent, even if the agent is SIGKILLed."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":  # run from the imported module, whose globals (_STATE) the harness's calls see
    from moebench import distributed  # noqa: PLW0406
    distributed.worker(sys.argv[1])
