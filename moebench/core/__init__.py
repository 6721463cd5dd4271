"""The measurement core: build the step, check parity, warm up, time, take memory. Every executor calls it (one
process: moebench.harness; torchrun ranks: moebench.distributed; train-run: moebench.train; paired rounds:
moebench.paired); it calls none of them.

  steps.py    the step a case times, in its execution mode (eager | compile | graphs | compile-graphs)
  parity.py   the backend against `naive` in higher precision, on one process or one rank of R
  timing.py   warm-up, timed blocks with CUDA events, precision-driven repeats
  here        why a case cannot run (skip_reason), the memory budget, memory, the L2 flush, and measure():
              the single-process composition of all of it into a record's metrics

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import math
import os
import resource
import shutil

import torch

from moebench import components, envinfo, metrics
from moebench.core.parity import TOLERANCE, mismatch_reason, parity, routing_for
from moebench.core.steps import DTYPES, EXECS, Step
from moebench.core.steps import build as build_step
from moebench.core.steps import reset_compiler
from moebench.core.timing import Timing, collector_off, summarize, time_precise, timed_block, warm_up
from moebench.registry import all_backends, get
from moebench.routing import dropped_fraction
from moebench.spec import Case

__all__ = ["DTYPES", "EXECS", "TOLERANCE", "NonFiniteLoss", "Step", "Timing", "apply_memory_budget", "build_step",
           "collector_off", "first_line", "l2_flush", "measure", "memory", "mismatch_reason", "parity",
           "reset_compiler", "reset_peak", "routing_for",
           "shape_of", "skip_reason", "time_precise", "timed_block", "timing_metrics", "warm_up"]

L2_FLUSH_BYTES = 256 * 2**20


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:500] if s else type(e).__name__


def shape_of(case: Case) -> dict:
    """What a backend's `supports` sees of a case."""
    w, spec = case.workload, case.model
    return {"T": w.tokens, "D": spec.d_model, "F": spec.d_expert, "E": spec.n_experts, "K": spec.top_k,
            "n_shared": spec.n_shared_experts, "d_shared": spec.d_shared or spec.d_expert, "gemm_dtype": w.gemm_dtype}


def skip_reason(case: Case, backend) -> str | None:
    """Why this case cannot run here (backend, attention/norm variant, CUDA, execution mode), or None."""
    w, spec = case.workload, case.model
    reason = backend.why_not(case.device, w.dtype, shape_of(case))
    if reason is None and w.level in ("model", "train-run"):
        reason = components.why_not(spec.attention, spec.norm, case.device, w.dtype)
    if reason is None and case.device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA requested but torch.cuda.is_available() is False"
    return reason or exec_reason(case, backend)


def exec_reason(case: Case, backend) -> str | None:
    """Why the case's execution mode cannot run it (never silently eager instead), or None."""
    w = case.workload
    if w.exec == "eager":
        return None
    if w.level == "train-run":
        return f"exec '{w.exec}' applies to layer and model steps; a train-run is timed as it trains (eager)"
    if w.exec in ("graphs", "compile-graphs"):
        if case.device != "cuda":
            return "CUDA graphs need CUDA"
        sync = backend.sync_reason(case.device, w.dtype, w.gemm_dtype)
        if sync:
            return f"{backend.name} syncs with the host ({sync}): a CUDA graph cannot capture its step"
        if w.exec == "compile-graphs" and backend.needs_process_group:
            return f"{backend.name} runs across processes: compile-graphs is not built for collectives (graphs is)"
        local = {**backend.options, **case.backend_options}.get("local")  # expert parallel: the backend it runs on
        if local is not None and local in all_backends():
            sync = all_backends()[local].sync_reason(case.device, w.dtype, w.gemm_dtype)
            if sync:
                return f"{backend.name}'s local backend {local} syncs with the host ({sync}): a CUDA graph cannot " \
                       f"capture its step"
        r = case.model.router
        if w.level == "model" and w.mode == "train" and (r.aux_ramp_steps or r.moe_warmup_steps):
            return "router ramps change every step; a captured step would freeze them"
    if w.exec == "compile" and case.device == "cpu" and not (shutil.which("c++") or shutil.which("g++")
                                                             or shutil.which("gcc")):
        return "torch.compile on CPU needs a C++ compiler (none of c++, g++, gcc on PATH)"
    return None


def apply_memory_budget(case: Case) -> None:
    if case.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        frac = 1.0 if case.memory_budget_gib is None else min(1.0, case.memory_budget_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(frac)


def memory(device: torch.device, exclude_bytes: int = 0) -> dict:
    """Peak memory since the last reset: allocated and reserved on CUDA (minus `exclude_bytes` of harness
    buffers, said in the record), peak RSS of the worker process on CPU."""
    if device.type == "cuda":
        m = {"peak_allocated_gib": (torch.cuda.max_memory_allocated() - exclude_bytes) / 2**30,
             "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        if exclude_bytes:
            m["excludes"] = f"the harness's {exclude_bytes / 2**30:.2f} GiB L2-flush buffer"
        m["scope"] = "from the built, initialised weights through warm-up and timing (and compile or capture)"
        return {"memory": m}
    return {"memory": {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "note": "peak RSS of the worker process"}}


def reset_peak(device: torch.device) -> None:
    """Start the peak-memory count here: once the weights are built and initialised (their fp32 draw is not the
    step's memory), before warm-up, compile or capture (optimizer state, activations and a graph's pool are)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def l2_flush(case: Case, device: torch.device) -> torch.Tensor | None:
    """The buffer overwritten before each layer-level step on CUDA (so no step starts with a warm L2)."""
    if device.type == "cuda" and case.workload.level == "layer":
        return torch.empty(L2_FLUSH_BYTES // 4, device=device)
    return None


def _finite_loss(i: int, v: float | None) -> None:
    if v is not None and not math.isfinite(v):
        raise NonFiniteLoss(i, v)


def timing_metrics(case: Case, step: Step, t: Timing, n_warm: int, device: torch.device, *, ranks: int = 1,
                   step_ms: list[float] | None = None) -> dict:
    """rates, precision and noise of a timing (step_ms: the per-step times to rate, e.g. the slowest rank's)."""
    ms = t.step_ms if step_ms is None else step_ms
    ceiling = envinfo.ceiling(device)
    sheet = metrics.datasheet_peak(envinfo.gpu_name())
    m = metrics.rates(ms, case.workload.tokens * ranks, step.flops_per_token, ceiling["tflops"] * ranks,
                      sheet * ranks if sheet else None)
    p = t.precision
    m["precision"] = p if step_ms is None else summarize(ms, t.block_steps, p["target"], p["max_time_s"],
                                                          p["time_s"])
    m["noisy"] = metrics.noise(m, m["precision"])
    m["warmup_steps"] = n_warm
    info = dict(step.exec_info) | (step.finish() if step.finish else {})
    m["exec"] = info
    return m


def measure(case: Case, device: torch.device) -> dict:
    """One process: build the step, warm up, time until precise, and the record's metrics."""
    w, spec = case.workload, case.model
    backend = get(case.backend)
    opts = backend.call_options(case.backend_options, w.gemm_dtype)
    flush = l2_flush(case, device)
    reset_compiler()
    step = build_step(case, device, built=lambda: reset_peak(device))
    n_warm, est_s = warm_up(step, w.warmup, device, check=lambda i, out: _finite_loss(i, step.losses_of(out)))
    t = time_precise(step, device, first=n_warm, est_s=est_s, min_steps=w.repeats, precision=case.precision,
                     max_time_s=case.max_time_s, flush=flush)
    counts = [[c.tolist() for c in step.routes_of(o)] for o in t.outs]
    losses = [v for v in t.losses if v is not None]
    for i, v in enumerate(losses):
        _finite_loss(n_warm + i, v)
    m = timing_metrics(case, step, t, n_warm, device)
    m |= memory(device, flush.numel() * flush.element_size() if flush is not None else 0)
    m |= {"balance": metrics.balance_block(counts), "weight_layout": backend.weight_layout} | step.extra
    path = backend.path_taken(case.device, w.dtype, w.gemm_dtype)
    if path:
        m["backend_path"] = path
    if backend.capacity is not None:
        m["dropped_frac"] = dropped_fraction(counts, backend.capacity(w.tokens, spec.top_k, spec.n_experts, **opts))
    if os.environ.get("MOEBENCH_PROFILE_DIR"):
        m["profile"] = profile(step, n_warm + len(t.step_ms), device, case)
    if losses:
        m["loss_curve"] = losses
    return m


def profile(step: Step, i0: int, device: torch.device, case: Case, n: int = 3) -> dict:
    """After timing (never inside it): n steps under torch.profiler. Writes the top ops by device time to
    $MOEBENCH_PROFILE_DIR/<case_key>.txt and returns the kernel list (name, total ms over the n steps, calls)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for i in range(n):
            if step.before is not None:
                step.before(i0 + i)
            step.run(i0 + i)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path = Path(os.environ["MOEBENCH_PROFILE_DIR"]) / f"{case.key}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{case.label}\n{n} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
    kernels = []
    for ev in prof.key_averages():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue  # on CUDA: the kernels themselves, not the CPU ops that launched them
        us = getattr(ev, "self_device_time_total", 0.0) if cuda else ev.self_cpu_time_total
        if us and us > 0:
            kernels.append({"name": ev.key[:300], "ms": us / 1e3, "calls": int(ev.count)})
    kernels.sort(key=lambda k: -k["ms"])
    return {"path": str(path), "steps": n, "device": "cuda" if cuda else "cpu", "kernels": kernels[:200]}
