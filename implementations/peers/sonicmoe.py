"""sonicmoe: adapter to the installed `sonic-moe` package (SonicMoE, CuTe DSL kernels for Hopper), read
against sonic-moe 0.1.2.post1 (quack-kernels 0.3.11, nvidia-cutlass-dsl 4.4.2).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots (slot s = t*K + k).
Fed with OUR routing decisions through its public functional API `sonicmoe.moe_general_routing_inputs(
x, router_scores_S, token_indices_S, expert_indices_S, w1, b1, w2, b2, E, stream_id, activation,
is_inference_mode)`, which returns (y_TD, expert_frequency_E). token_indices_S must be sorted ascending
(ours: t repeated K times), int32 like expert_indices_S; router scores are upcast to fp32 inside
(differentiably); E and stream_id are unused (E comes from w2, the stream is torch's current one).
Autograd gives dx, dw1, dw2 and d(router scores) unless is_inference_mode, which skips storing the
pre-activation its backward needs. Its weight layout differs from ours:
  w1: view (2F, D, E) over memory (E, 2F, D) with gate/up rows interleaved [g0, u0, g1, u1, ...]
  w2: view (D, F, E) over memory (E, D, F)
so every call converts w1_EDF2 / w2_EFD (one differentiable copy each, timed as part of this backend).
Its first call for each shape compiles and autotunes its GEMMs (quack) for minutes: warm up outside the
timed region.
"""
import importlib.util

import torch

from moebench.registry import Backend, register


def to_sonic_layout(w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor):
    E, D, F2 = w1_EDF2.shape
    # (E, D, 2, F) -> (E, F, 2, D) -> rows g0 u0 g1 u1 ... of (E, 2F, D): the reshape is the one copy
    w1_F2DE = w1_EDF2.unflatten(2, (2, F2 // 2)).permute(0, 3, 2, 1).reshape(E, F2, D).permute(1, 2, 0)
    w2_DFE = w2_EFD.transpose(1, 2).contiguous().permute(1, 2, 0)
    return w1_F2DE, w2_DFE


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    import sonicmoe
    from sonicmoe.enums import ActivationType

    T, K = idx_TK.shape
    E = w1_EDF2.shape[0]
    w1, w2 = to_sonic_layout(w1_EDF2, w2_EFD)
    token_S = torch.arange(T, device=x_TD.device, dtype=torch.int32).repeat_interleave(K)
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, p_TK, w1_EDF2, w2_EFD)))
    y_TD, _ = sonicmoe.moe_general_routing_inputs(
        x_TD.contiguous(), p_TK.reshape(-1), token_S, idx_TK.reshape(-1).to(torch.int32), w1, None, w2, None,
        E, torch.cuda.current_stream().cuda_stream, ActivationType.SWIGLU, inference)
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
    description="SonicMoE (sonic-moe package, CuTe DSL) through moe_general_routing_inputs on our routing",
    devices=("cuda",),
    dtypes=("bfloat16",),
    available=_available,
))
