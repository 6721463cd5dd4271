"""Runs one Case and returns one Record: availability -> parity vs naive -> build -> warm-up -> timed steps.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
The harness times; backends never time themselves. GPU: CUDA events around each step, warm-up first,
L2 flushed between layer-level repeats. CPU: perf_counter. Parity compares the backend with `naive` in
higher precision (fp32 cases: float64 reference; bf16/fp16: float32) on the same weights, inputs AND routing
decisions; a failure is status `mismatch` and nothing is timed.
"""
from __future__ import annotations

import gc
import math
import os
import resource
import time
import traceback

import torch

from moebench import components, envinfo, metrics
from moebench.model import MoEModel, build_layer, in_layout
from moebench.registry import get
from moebench.results import make_record
from moebench.routing import capacity_keep, dropped_fraction, synthetic_idx
from moebench.spec import Case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
L2_FLUSH_BYTES = 256 * 2**20
WARMUP_MIN_S = 1.0


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step


def run_case(case: Case, run_id: str, env: dict) -> dict:
    """Never raises for a problem of the case itself: every outcome is a record."""
    def rec(status, reason="", m=None):
        return make_record(case, status, run_id=run_id, env=env, reason=reason, metrics=m)

    try:
        backend = get(case.backend)
    except KeyError as e:
        return rec("failed", str(e))
    reason = skip_reason(case, backend)
    if reason:
        return rec("skipped", reason)
    device = torch.device(case.device)
    m: dict = {}
    if backend.needs_process_group:  # expert parallel: every rank of the case runs this; rank 0 gathers
        from moebench import distributed
        parity_fn, measure_fn = distributed.parity, distributed.measure
    else:
        parity_fn, measure_fn = parity, measure
    try:
        _apply_memory_budget(case)
        m["parity"] = parity_fn(case)
        if not m["parity"]["ok"]:
            return rec("mismatch", mismatch_reason(m["parity"]), m)
        m |= measure_fn(case, device)
        return rec("ok", "", m)
    except torch.OutOfMemoryError as e:
        return rec("oom", _first_line(e), m | _memory(device))
    except NonFiniteLoss as e:
        return rec("failed", str(e), m | getattr(e, "metrics", {}) | {"failed_step": e.step})
    except Exception as e:  # noqa: BLE001 - one failing case never stops the suite
        if "DefaultCPUAllocator: can't allocate memory" in str(e):  # CPU out of memory: a RuntimeError
            return rec("oom", _first_line(e), m | _memory(device))
        return rec("failed", f"{type(e).__name__}: {_first_line(e)}", m | {"traceback": traceback.format_exc()[-4000:]})
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def skip_reason(case: Case, backend) -> str | None:
    """Why this case cannot run here (backend, attention/norm variant, CUDA), or None."""
    w, spec = case.workload, case.model
    reason = backend.why_not(case.device, w.dtype, shape_of(case))
    if reason is None and w.level in ("model", "train-run"):
        reason = components.why_not(spec.attention, spec.norm, case.device, w.dtype)
    if reason is None and case.device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA requested but torch.cuda.is_available() is False"
    return reason


def mismatch_reason(par: dict) -> str:
    worst = max(par["errors"], key=par["errors"].get)
    return f"{worst} rel err {par['errors'][worst]:.3g} > tol {par['tol']:.0e} vs naive"


def shape_of(case: Case) -> dict:
    """What a backend's `supports` sees of a case."""
    w, spec = case.workload, case.model
    return {"T": w.tokens, "D": spec.d_model, "F": spec.d_expert, "E": spec.n_experts, "K": spec.top_k,
            "n_shared": spec.n_shared_experts, "d_shared": spec.d_shared or spec.d_expert}


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:500] if s else type(e).__name__


def _apply_memory_budget(case: Case) -> None:
    if case.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        frac = 1.0 if case.memory_budget_gib is None else min(1.0, case.memory_budget_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(frac)


# ----------------------------------------------------------------------------------------------- parity
def routing_for(case: Case, T: int, gen: torch.Generator, layer: int = 0) -> torch.Tensor:
    """idx_TK for parity: the workload's synthetic table, or top-k of random router scores for `learned`."""
    spec, w = case.model, case.workload
    if w.routing != "learned":
        return synthetic_idx(w.routing, T, spec.n_experts, spec.top_k, seed=w.seed * 1000 + layer)
    return torch.randn(T, spec.n_experts, generator=gen).topk(spec.top_k, dim=-1).indices


def parity(case: Case) -> dict:
    """Output and every gradient (x, w1, w2, p) of the backend vs naive in higher precision. A capacity
    backend (Backend.capacity) is compared with naive on the slots it keeps: dropped slots weigh 0 there."""
    backend, naive = get(case.backend), get("naive")
    spec, w = case.model, case.workload
    if not backend.dropless and backend.capacity is None:
        return {"ok": True, "skipped": f"{backend.name} drops tokens by design; no dropless reference"}
    dev, dt = torch.device(case.device), DTYPES[w.dtype]
    ref_dt = torch.float64 if dt == torch.float32 else torch.float32
    T, D, Fh, E = w.tokens, spec.d_model, spec.d_expert, spec.n_experts
    n_fold = spec.n_shared_experts if backend.folds_shared else 0  # checked as timed: E + n_s experts, K + n_s
    E += n_fold
    g = torch.Generator().manual_seed(w.seed + 12345)
    gd = torch.Generator(device=dev).manual_seed(w.seed + 12345)  # big tensors are drawn on the device: fast
    base = {
        "x_TD": torch.randn(T, D, generator=gd, device=dev),
        "w1_EDF2": torch.randn(E, D, 2 * Fh, generator=gd, device=dev) / math.sqrt(D),
        "w2_EFD": torch.randn(E, Fh, D, generator=gd, device=dev) / math.sqrt(Fh),
        "p_TK": torch.rand(T, spec.top_k + n_fold, generator=gd, device=dev) + 0.05,
    }
    idx_TK = routing_for(case, T, g).to(dev)
    if n_fold:  # every token also goes to the always-on experts E-n_fold .. E-1
        idx_TK = torch.cat([idx_TK, torch.arange(E - n_fold, E, device=dev).expand(T, n_fold)], dim=1)
    dy_TD = torch.randn(T, D, generator=gd, device=dev)
    opts = {**backend.options, **case.backend_options}
    keep_TK, extra = None, {}
    if backend.capacity is not None:
        C = backend.capacity(T, spec.top_k, E, **opts)
        keep_TK = capacity_keep(idx_TK, E, C)
        extra = {"capacity": C, "dropped_frac": 1.0 - keep_TK.float().mean().item()}

    def run(fn, dtype, keep=None, layout="canonical", **opts):
        leaves = {k: v.detach().to(dev, dtype) for k, v in base.items()}
        leaves["w1_EDF2"], leaves["w2_EFD"] = in_layout(leaves["w1_EDF2"], leaves["w2_EFD"], layout)
        leaves = {k: v.requires_grad_() for k, v in leaves.items()}
        p_TK = leaves["p_TK"] if keep is None else leaves["p_TK"] * keep  # dropped slots weigh 0
        y = fn(leaves["x_TD"], idx_TK, p_TK, leaves["w1_EDF2"], leaves["w2_EFD"], **opts)
        y.backward(dy_TD.to(dev, dtype))
        return {"y": y.detach()} | {f"d{k.split('_')[0]}": v.grad for k, v in leaves.items()}

    ref = run(naive.forward, ref_dt, keep=keep_TK)
    got = run(backend.forward, dt, layout=backend.weight_layout, **opts)  # the weights stored as when timed
    errors = {k: metrics.rel_err(got[k] if got[k] is not None else torch.zeros_like(ref[k]), ref[k]) for k in ref}
    tol = TOLERANCE[w.dtype]
    return {"ok": all(e <= tol for e in errors.values()), "errors": errors, "tol": tol,
            "reference": f"naive in {str(ref_dt).replace('torch.', '')}"
                         + (" on the kept slots" if keep_TK is not None else ""), "T": T} | extra


# ------------------------------------------------------------------------------------------------ timing
class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append([ev, None])
        else:
            self.spans.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans[-1][1] = ev
        else:
            self.spans[-1][1] = time.perf_counter()

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.spans]
        return [(b - a) * 1e3 for a, b in self.spans]


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"memory": {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}}
    return {"memory": {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "note": "peak RSS of the worker process"}}


def measure(case: Case, device: torch.device) -> dict:
    w, spec = case.workload, case.model
    backend = get(case.backend)
    opts = {**backend.options, **case.backend_options}
    torch.manual_seed(w.seed)
    if w.level == "train-run":  # a training run on real text: moebench/train.py records loss and balance
        from moebench import train
        return train.run(case, device)
    step, routes_of, extra, flops = build_step(case, device)
    flush = l2_flush(case, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_warm = _warm_up(step, w.warmup, device)
    step_ms, outs = timed_steps(step, n_warm, w.repeats, device, flush)
    counts = [[c.tolist() for c in routes_of(o)] for o in outs]
    losses = [float(o["loss"]) for o in outs if isinstance(o, dict) and "loss" in o]
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            raise NonFiniteLoss(n_warm + i, v)
    ceiling = envinfo.ceiling(device)
    m = metrics.rates(step_ms, w.tokens, flops, ceiling["tflops"], metrics.datasheet_peak(envinfo.gpu_name()))
    m |= _memory(device) | {"balance": metrics.balance_block(counts), "weight_layout": backend.weight_layout} | extra
    if backend.capacity is not None:
        m["dropped_frac"] = dropped_fraction(counts, backend.capacity(w.tokens, spec.top_k, spec.n_experts, **opts))
    if os.environ.get("MOEBENCH_PROFILE_DIR"):
        m["profile"] = _profile(step, n_warm + w.repeats, device, case)
    if losses:
        m["loss_curve"] = losses
    return m


def build_step(case: Case, device: torch.device):
    """(step(i), routes_of(output), extra metrics, matmul FLOPs per token) of a layer or model case, as it is
    timed: step(i) runs one training (or forward) step on input buffer i."""
    w, spec = case.workload, case.model
    backend = get(case.backend)
    opts = {**backend.options, **case.backend_options}
    if w.level == "layer":
        step, routes_of, extra = _layer_step(case, backend, opts, device, DTYPES[w.dtype])
        flops = spec.layer_flops_per_token()
    else:
        step, routes_of, extra = _model_step(case, backend, opts, device, DTYPES[w.dtype])
        flops = spec.flops_per_token(w.seq)
    return step, routes_of, extra, flops * (3 if w.mode == "train" else 1)


def l2_flush(case: Case, device: torch.device) -> torch.Tensor | None:
    """The buffer timed_steps overwrites before each layer-level step on CUDA (so no step starts with a warm L2)."""
    if device.type == "cuda" and case.workload.level == "layer":
        return torch.empty(L2_FLUSH_BYTES // 4, device=device)
    return None


def _profile(step, i0: int, device: torch.device, case: Case) -> str:
    """After timing (never inside it): 3 steps under torch.profiler; writes the top ops by device time."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            step(i0 + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = Path(os.environ["MOEBENCH_PROFILE_DIR"]) / f"{case.key}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{case.label}\n3 steps\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
    return str(path)


def timed_steps(step, first: int, repeats: int, device: torch.device, flush=None, before=None):
    """The timed region: `repeats` calls of step(i), each between two CUDA events (perf_counter on CPU), the
    collector off, L2 flushed before each step when a flush buffer is given (outside the events), and
    before(i) called first when given. Returns (step_ms, outputs)."""
    timer, outs = _Timer(device), []
    gc.collect()
    gc.disable()  # no collector pauses inside the timed steps
    try:
        for i in range(repeats):
            if flush is not None:
                flush.fill_(float(i))
            if before is not None:
                before(i)
            timer.start()
            outs.append(step(first + i))
            timer.stop()
        return timer.ms(), outs
    finally:
        gc.enable()


def _warm_up(step, n: int, device: torch.device) -> int:
    """At least n steps; on CUDA also at least WARMUP_MIN_S seconds of them, so clocks, the caching allocator
    and autotuners have settled before the first timed step. Returns the number of warm-up steps run."""
    t0, i = time.perf_counter(), 0
    while i < n or (device.type == "cuda" and time.perf_counter() - t0 < WARMUP_MIN_S and i < 200):
        step(i)
        i += 1
        if device.type == "cuda" and i >= n:
            torch.cuda.synchronize()
    return i


def _layer_step(case, backend, opts, device, dt):
    w, spec = case.workload, case.model
    with device:  # parameters are allocated and drawn on the device
        layer = build_layer(spec, backend, opts, seed=w.seed).to(dtype=dt)
    if w.routing != "learned":
        layer.router.fixed_idx_TK = synthetic_idx(w.routing, w.tokens, spec.n_experts, spec.top_k,
                                                  seed=w.seed * 1000).to(device)
    g = torch.Generator(device=device).manual_seed(w.seed + 1)
    n_buf = 3  # rotate among fresh inputs so no step reuses the last one's cache lines
    xs = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(n_buf)]
    dys = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(n_buf)]
    train = w.mode == "train"
    if train:
        for x in xs:
            x.requires_grad_()

    def step(i):
        x = xs[i % n_buf]
        if train:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, r = layer(x)
            y.backward(dys[i % n_buf])
        else:
            with torch.no_grad():
                y, r = layer(x)
        return r.counts_E

    return step, lambda c: [c], {}


def _model_step(case, backend, opts, device, dt):
    w, spec = case.workload, case.model
    with device:
        model = MoEModel(spec, backend, opts, seed=w.seed).to(dtype=dt)
    if w.routing != "learned":
        for li, moe in enumerate(model.moe_layers):
            moe.router.fixed_idx_TK = synthetic_idx(w.routing, w.tokens, spec.n_experts, spec.top_k,
                                                    seed=w.seed * 1000 + li).to(device)
    g = torch.Generator(device=device).manual_seed(w.seed + 1)
    ids = [torch.randint(0, spec.vocab_size, (w.batch, w.seq), device=device, generator=g) for _ in range(4)]
    train = w.mode == "train"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1) if train else None
    if not train:
        model.eval()

    def step(i):
        batch = ids[i % len(ids)]
        if train:
            out = model(batch, batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()
            return {"loss": out["loss"].detach(), "counts": [r.counts_E for r in out["routes"]]}
        with torch.no_grad():
            out = model(batch)
        return {"counts": [r.counts_E for r in out["routes"]]}

    return step, lambda o: o["counts"], {"params": spec.params()}
