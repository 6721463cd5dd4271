"""Build the step a case times, in its execution mode: eager, compile or graphs.

Legend: T tokens, D model dim, E experts, K top-k, L MoE layers, B batch, S seq.

A step is one training (or forward) step of the MoE layer alone or of the whole model on input buffer i
(buffers rotate, so no step reuses the last one's cache lines):
  layer/train   zero grads, y = layer(x_i), y.backward(dy_i)
  model/train   zero grads, loss = model(ids_i), backward, clip at 1.0, AdamW step, loss-free bias update
  forward       the forward alone, under no_grad
Execution modes (workload.exec):
  eager    the step as PyTorch runs it op by op: at small batches this times the Python launch path
  compile  the layer or model wrapped in torch.compile (default mode, Inductor); backward through AOTAutograd;
           the optimizer step stays eager. The first call compiles: its time is `compile_s`, never a step
  graphs   the whole step (forward, backward and, at model level, the clip and the optimizer step with a
           capturable fused AdamW) captured once into one CUDA graph with torch.cuda.graph and replayed.
           The graph holds the SAME kernels as eager (no compiler in between), so eager vs graphs isolates
           what launching costs; reduce-overhead would also fuse ops and conflate the two. Inputs are copied into
           the graph's static buffers before each replay, outside the timed region. The capture (three warm-up
           steps on a side stream, then one captured step) is `capture_s`.
  compile-graphs  torch.compile(mode="reduce-overhead"): Inductor's fused kernels, forward and backward replayed
           as CUDA graphs (cudagraph trees); the optimizer step stays eager. What a practitioner who compiles gets:
           compile vs compile-graphs isolates launching for the fused kernels as eager vs graphs does for the
           plain ones. Each step starts with torch.compiler.cudagraph_mark_step_begin(); first call as compile.
What the step returns (layer: counts_E; model: loss and counts per layer) is copied by `after` outside the timed
region; in graphs mode these are the graph's static outputs, overwritten by the next replay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moebench.model import MoEModel, build_layer
from moebench.registry import get
from moebench.routing import fixed_idx
from moebench.spec import Case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXECS = {
    "eager": "PyTorch runs the step op by op from Python, as most training scripts do. At small batches the GPU "
             "waits on the Python launch path, so the number measures the host as much as the MoE.",
    "compile": "The layer or model under torch.compile (Inductor fuses the glue ops; the optimizer step stays "
               "eager). Compile time is recorded apart from the step, with dynamo's graph-break and recompile counts.",
    "graphs": "The whole step (forward, backward, clip and optimizer) captured once as a CUDA graph and replayed: "
              "the same kernels as eager, no launch path. Needs CUDA and a backend that never syncs with the host.",
    "compile-graphs": "torch.compile's reduce-overhead mode: Inductor's fused kernels, forward and backward replayed "
                      "as CUDA graphs, the optimizer step eager. Needs CUDA and a backend that never syncs with the host.",
}
N_BUF = 3            # rotating input buffers at layer level (model level: 4 token batches)
CAPTURE_WARMUP = 3   # eager steps on a side stream before the capture (allocator, autotuners, optimizer state)


@dataclass
class Step:
    """A step ready to time. run(i) is the timed call; before(i) and after(out) run outside the timed region."""
    run: Callable[[int], Any]
    routes_of: Callable[[Any], list]        # counts_E per MoE layer, from what after() returned
    flops_per_token: float                  # matmul FLOPs per token of one step (x3 for train)
    before: Callable[[int], None] | None = None
    after: Callable[[Any], Any] = lambda out: out
    extra: dict = field(default_factory=dict)   # metrics the record carries (params, optimizer, ...)
    exec_info: dict = field(default_factory=dict)  # mode, compile_s / capture_s, graph_breaks, recompiles
    losses_of: Callable[[Any], float | None] = lambda out: None
    finish: Callable[[], dict] | None = None      # after timing: more exec_info (compile: recompiles)
    keepalive: Any = None                         # graphs: the graph and all it reads, held as long as the step


def build(case: Case, device: torch.device, *, rank: int = 0, built=None) -> Step:
    """The case's step on `device`. rank r > 0 (expert parallel) draws its own inputs and routing table. built(),
    if given, is called once the module, its weights and inputs exist and before the execution mode wraps the
    step (compile, capture): the measurement core resets the peak-memory counter there, so the weights' fp32
    initialisation does not count as the step's peak while a graph's capture does."""
    w, spec = case.workload, case.model
    backend = get(case.backend)
    opts = backend.call_options(case.backend_options, w.gemm_dtype)
    dt = DTYPES[w.dtype]
    torch.manual_seed(w.seed)
    if w.level == "layer":
        fn, bufs, module, routes_of, extra = _layer(case, backend, opts, device, dt, rank)
        flops = spec.layer_flops_per_token()
    elif w.level == "model":
        fn, bufs, module, routes_of, extra = _model(case, backend, opts, device, dt, w.exec == "graphs")
        flops = spec.flops_per_token(w.seq)
    else:
        raise ValueError(f"level '{w.level}' has no single step to time")
    flops *= 3 if w.mode == "train" else 1
    step = Step(run=lambda i: fn(*bufs[i % len(bufs)]), routes_of=routes_of, flops_per_token=flops, extra=extra,
                exec_info={"mode": w.exec}, losses_of=_loss_of)
    if built is not None:
        built()
    if w.exec in ("compile", "compile-graphs"):
        _compile(step, module, fn, bufs, w.exec)
    elif w.exec == "graphs":
        _graph(step, module, fn, bufs, device, across_processes=backend.needs_process_group)
    return step


def _loss_of(out) -> float | None:
    return float(out["loss"]) if isinstance(out, dict) and "loss" in out else None


# ------------------------------------------------------------------------------------------------ the steps
def _fixed_routing(case: Case, moes, device, rank: int) -> None:
    """Fixed routing (uniform | zipf | hot | trace): one table per MoE layer, drawn (or replayed) once per case."""
    w, spec = case.workload, case.model
    if w.routing == "learned":
        return
    for li, moe in enumerate(moes):
        moe.router.fixed_idx_TK = fixed_idx(w.routing, w.tokens, spec.n_experts, spec.top_k,
                                            seed=w.seed * 1000 + li + rank, layer=li).to(device)


def _layer(case, backend, opts, device, dt, rank):
    w, spec = case.workload, case.model
    with device:  # parameters are allocated and drawn on the device
        layer = build_layer(spec, backend, opts, seed=w.seed).to(dtype=dt)
    _fixed_routing(case, [layer], device, rank)
    g = torch.Generator(device=device).manual_seed(w.seed + 1 + 7919 * rank)
    xs = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(N_BUF)]
    dys = [torch.randn(w.tokens, spec.d_model, device=device, dtype=dt, generator=g) for _ in range(N_BUF)]
    train = w.mode == "train"
    for x in xs:
        x.requires_grad_(train)
    holder = {"layer": layer}  # compile swaps in the compiled module

    def fn(x, dy):
        if not train:
            with torch.no_grad():
                return holder["layer"](x)[1].counts_E
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, r = holder["layer"](x)
        y.backward(dy)
        return r.counts_E

    return fn, list(zip(xs, dys)), holder, lambda c: [c], {}


def _model(case, backend, opts, device, dt, capturable: bool):
    w, spec = case.workload, case.model
    with device:
        model = MoEModel(spec, backend, opts, seed=w.seed).to(dtype=dt)
    _fixed_routing(case, model.moe_layers, device, 0)
    g = torch.Generator(device=device).manual_seed(w.seed + 1)
    ids = [(torch.randint(0, spec.vocab_size, (w.batch, w.seq), device=device, generator=g),) for _ in range(4)]
    train = w.mode == "train"
    extra = {"params": spec.params()}
    opt = None
    if train:
        fused = device.type == "cuda"  # the same optimizer kernels in every mode; capturable only for graphs
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=fused or None, capturable=capturable)
        extra["optimizer"] = "AdamW" + (" fused" if fused else " foreach") + (" capturable" if capturable else "")
    else:
        model.eval()
    holder = {"layer": model}

    def fn(batch):
        if not train:
            with torch.no_grad():
                out = holder["layer"](batch)
            return {"counts": [r.counts_E for r in out["routes"]]}
        opt.zero_grad(set_to_none=True)
        out = holder["layer"](batch, batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_biases()
        return {"loss": out["loss"].detach(), "counts": [r.counts_E for r in out["routes"]]}

    return fn, ids, holder, lambda o: o["counts"], extra


# ------------------------------------------------------------------------------------------------ exec modes
def _compile(step: Step, holder: dict, fn, bufs, exec_: str) -> None:
    """torch.compile the module (compile-graphs: mode reduce-overhead); the first call (compiled here,
    synchronised) is compile_s, not a step."""
    from torch._dynamo.utils import counters

    gb0, ok0, skips0 = _graph_breaks(), int(counters["frames"]["ok"]), _cudagraph_skips()  # others' compiles
    reasons0 = set(counters["graph_break"])
    graphs = exec_ == "compile-graphs"
    holder["layer"] = torch.compile(holder["layer"], mode="reduce-overhead" if graphs else None)
    if graphs:  # each step begins a new graph-tree step, which may overwrite the last one's outputs: after() copies
        step.run = lambda i: (torch.compiler.cudagraph_mark_step_begin(), fn(*bufs[i % len(bufs)]))[1]
        step.after = _clone
    t0 = time.perf_counter()
    step.run(0)
    _sync(bufs)
    skips = _cudagraph_skips() - skips0
    step.exec_info |= {"compile_s": time.perf_counter() - t0, "graph_breaks": _graph_breaks() - gb0,
                       "graph_break_reasons": sorted({k.splitlines()[0][:200] for k in set(counters["graph_break"]) - reasons0}),
                       "frames_compiled": int(counters["frames"]["ok"]) - ok0, "cudagraph_skips": skips}
    if graphs and skips:  # inductor ran the step without CUDA graphs: that is `compile`, not this
        raise RuntimeError(f"compile-graphs: inductor skipped CUDA graphs {skips} time(s) (it says why "
                           "with TORCH_LOGS=perf_hints); timing it would time plain compile under compile-graphs")
    frames0 = int(counters["frames"]["total"])

    def finish() -> dict:
        """After timing: graph breaks, frames compiled since the first call (recompiles), CUDA-graph skips."""
        return {"graph_breaks": _graph_breaks() - gb0, "recompiles": int(counters["frames"]["total"]) - frames0,
                "cudagraph_skips": _cudagraph_skips() - skips0}

    step.finish = finish


def reset_compiler() -> None:
    """Between cases (a reused worker or rank; once per paired group, never between its cases, whose compiled code
    must survive until timed): nothing from earlier compiles (code caches, recompile limits, counters)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def _cudagraph_skips() -> int:
    """How often inductor (mode reduce-overhead) fell back to running a graph without CUDA graphs."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def _graph(step: Step, holder: dict, fn, bufs, device: torch.device, across_processes: bool = False) -> None:
    """Capture one step as a CUDA graph over static copies of the first input; replays read the static buffers,
    which before(i) refills from buffer i outside the timed region. across_processes (an expert-parallel step, its
    NCCL collectives captured with it): capture_error_mode thread_local, because other threads of the process
    (NCCL's watchdog, polling the events of earlier collectives) may call CUDA while this thread captures, which the
    default global mode turns into a capture error. Unverified on a GPU so far (tests/gpu/test_gpu_ep.py checks it)."""
    static = tuple(b.detach().clone().requires_grad_(b.requires_grad) for b in bufs[0])
    module = holder["layer"]
    t0 = time.perf_counter()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            fn(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    module.zero_grad(set_to_none=True)  # the captured backward allocates the grads from the graph's pool
    for t in static:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    mode = "thread_local" if across_processes else "global"
    with torch.cuda.graph(graph, capture_error_mode=mode):
        out = fn(*static)
    torch.cuda.synchronize(device)
    step.exec_info |= {"capture_s": time.perf_counter() - t0, "capture": "torch.cuda.graph, whole step"
                       + (", capture_error_mode thread_local (NCCL collectives inside)" if across_processes else "")}
    # the graph reads the module's parameters, buffers and routing table and the static inputs by address: hold
    # them (through fn and its closure) as long as the step, or a collection frees them under the graph's feet
    step.keepalive = (graph, fn, holder, static, bufs)

    def before(i):
        with torch.no_grad():
            for s, b in zip(static, bufs[i % len(bufs)]):
                s.copy_(b)

    def run(i):
        graph.replay()
        return out

    step.run, step.before, step.after = run, before, _clone


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    if isinstance(out, list):
        return [_clone(v) for v in out]
    return out


def _sync(bufs) -> None:
    t = bufs[0][0]
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
