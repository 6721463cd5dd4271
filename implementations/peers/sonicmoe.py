"""sonicmoe: adapter to the installed `sonic-moe` package (SonicMoE, CuTe DSL kernels for Hopper), read
against sonic-moe 0.1.2.post1 (quack-kernels 0.3.11, nvidia-cutlass-dsl 4.4.2).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots (slot s = t*K + k).
Fed with OUR routing decisions (idx_TK, p_TK) and weights, by one of two paths (option `routing_path`):
  general  its public functional API `sonicmoe.moe_general_routing_inputs(x, router_scores_S, token_indices_S,
           expert_indices_S, w1, b1, w2, b2, E, stream_id, activation, is_inference_mode, concat_layout)`, built for
           a variable number of experts per token: token_indices_S sorted ascending (ours: t repeated K times),
           int32 like expert_indices_S; the per-token sums over k loop up to E.
  top_k    what its own layer (`moe_TC_softmax_topk_layer`) runs after its router: the fixed-K metadata kernel
           (`functional.triton_kernels.TC_topk_router_metadata_triton`) and the `_UpProjection` / `_DownProjection`
           autograd functions with K fixed. Internal names of 0.1.2.post1, not its public API.
Router scores go in as fp32 (upcast differentiably). Autograd gives dx, dw1, dw2 and d(router scores); inference
(no grad needed) skips storing the pre-activation h.
Its weights: w1 a (2F, D, E) view over memory (E, 2F, D), w2 a (D, F, E) view over memory (E, D, F). That is the
nn.Linear (out, in) storage moebench calls the `linear` weight layout, so the MoE layer stores this backend's weights
that way and no copy is made per call. Option `gate_up` says how w1's 2F rows are ordered:
  concat       [gate rows; up rows] (concat_layout=True): moebench's own order, a view of linear-stored weights;
  interleaved  [g0, u0, g1, u1, ...] (sonic's default): one copy of w1 per call, timed as part of this backend.
Canonically stored weights (parity of older code, direct calls) are copied to its layout per call.
Its first call for each shape compiles and autotunes its GEMMs (quack) for minutes: warm up outside the timed region.
"""
import importlib
import importlib.util
import sys

import torch

from moebench.registry import Backend, register

ROUTING_PATHS = ("general", "top_k")
GATE_UP_ROWS = ("concat", "interleaved")


def sonic_weights(w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor, gate_up: str = "concat"):
    """(w1_F2DE, w2_DFE) in SonicMoE's layout: views of `linear`-stored weights where the order allows, else copies."""
    E, D, F2 = w1_EDF2.shape
    if gate_up == "concat":
        w1_E2FD = w1_EDF2.transpose(1, 2).contiguous()  # no copy when stored linear
    else:  # (E, D, 2, F) -> (E, F, 2, D) -> rows g0 u0 g1 u1 ... of (E, 2F, D): the reshape is the one copy
        w1_E2FD = w1_EDF2.unflatten(2, (2, F2 // 2)).permute(0, 3, 2, 1).reshape(E, F2, D)
    w2_EDF = w2_EFD.transpose(1, 2).contiguous()
    return w1_E2FD.permute(1, 2, 0), w2_EDF.permute(1, 2, 0)


def _import(name: str):
    """Import a sonicmoe module with the process's argv hidden: nvidia-cutlass-dsl parses sys.argv with argparse when
    it is imported, and `moebench paired ... -d cuda` (which runs cases in-process) failed there: `-d` abbreviates its
    `-diagnostic` flag ("invalid choice: 'cuda'")."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return importlib.import_module(name)
    finally:
        sys.argv = argv


def _top_k(x_TD, idx_TK, s_TK, w1, w2, act, inference, concat):
    """SonicMoE's fixed-K layer body (moe_TC_softmax_topk_layer after its router) on our routing decisions."""
    functional = _import("sonicmoe.functional")
    _UpProjection, _DownProjection = functional._UpProjection, functional._DownProjection
    TC_topk_router_metadata_triton = _import("sonicmoe.functional.triton_kernels").TC_topk_router_metadata_triton

    T, K = idx_TK.shape
    E, S, dev = w2.shape[-1], idx_TK.numel(), idx_TK.device
    i32 = {"dtype": torch.int32, "device": dev}
    s_scatter_S, s_reverse_S, x_gather_S = (torch.empty(S, **i32) for _ in range(3))
    freq_E, offs_E1 = torch.empty(E, **i32), torch.empty(E + 1, **i32)
    TC_topk_router_metadata_triton(idx_TK.to(torch.int32).contiguous(), E, freq_E, offs_E1, x_gather_S, s_scatter_S,
                                   s_reverse_S)
    a, h = _UpProjection.apply(x_TD, w1, None, offs_E1, S, K, x_gather_S, s_scatter_S, s_reverse_S, None, False, act,
                               inference, concat)
    return _DownProjection.apply(a, h, w2, None, s_TK, offs_E1, T, K, x_gather_S, s_scatter_S, s_reverse_S, None,
                                 False, act)


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, routing_path="general", gate_up="concat"):
    if routing_path not in ROUTING_PATHS:
        raise ValueError(f"sonicmoe: routing_path must be one of {', '.join(ROUTING_PATHS)}, got {routing_path!r}")
    if gate_up not in GATE_UP_ROWS:
        raise ValueError(f"sonicmoe: gate_up must be one of {', '.join(GATE_UP_ROWS)}, got {gate_up!r}")
    sonicmoe = _import("sonicmoe")
    ActivationType = _import("sonicmoe.enums").ActivationType

    T, K = idx_TK.shape
    w1, w2 = sonic_weights(w1_EDF2, w2_EFD, gate_up)
    concat, act = gate_up == "concat", ActivationType.SWIGLU
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, p_TK, w1_EDF2, w2_EFD)))
    s_TK = p_TK.float()
    if routing_path == "top_k":
        y_TD = _top_k(x_TD.contiguous(), idx_TK, s_TK.contiguous(), w1, w2, act, inference, concat)
    else:
        token_S = torch.arange(T, device=x_TD.device, dtype=torch.int32).repeat_interleave(K)
        y_TD, _ = sonicmoe.moe_general_routing_inputs(
            x_TD.contiguous(), s_TK.reshape(-1), token_S, idx_TK.reshape(-1).to(torch.int32), w1, None, w2, None,
            w2.shape[-1], torch.cuda.current_stream().cuda_stream if x_TD.is_cuda else 0, act, inference, concat)
    return y_TD.to(x_TD.dtype)


def _available():
    if importlib.util.find_spec("sonicmoe") is None:
        return "sonic-moe not installed"
    if importlib.util.find_spec("cutlass") is None:  # a --target install skips the .pth adding it
        return "nvidia-cutlass-dsl's `cutlass` not importable (python_packages not on PYTHONPATH?)"
    if not torch.cuda.is_available():
        return "sonic-moe needs CUDA"
    if torch.cuda.get_device_capability()[0] < 9:
        return "sonic-moe needs a Hopper or newer GPU (compute capability >= 9.0)"
    return None


register(Backend(
    name="sonicmoe",
    forward=forward,
    description="SonicMoE (sonic-moe package, CuTe DSL) on our routing: its general-routing API or its fixed-top-K "
                "layer body (routing_path); weights stored nn.Linear-style, its own layout",
    devices=("cuda",),
    dtypes=("bfloat16",),
    options={"routing_path": "general", "gate_up": "concat"},
    available=_available,
    weight_layout="linear",
    host_sync="not verified free of host syncs under CUDA graphs (peer)",
))
