"""sonicmoe: adapter to the installed `sonic-moe` package (SonicMoE, CuTe DSL kernels for Hopper).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots (slot s = t*K + k).
Fed with OUR routing decisions through its public functional API `sonicmoe.moe_general_routing_inputs(
x, router_scores_S, token_indices_S (ascending), expert_indices_S, w1, b1, w2, b2, E, stream_id, activation,
is_inference_mode)`, which returns (y_TD, expert_frequency). Its weight layout differs from ours:
  w1: view (2F, D, E) over memory (E, 2F, D) with gate/up rows interleaved [g0, u0, g1, u1, ...]
  w2: view (D, F, E) over memory (E, D, F)
so every call converts w1_EDF2 / w2_EFD (a differentiable copy, timed as part of this backend).
Its first call JIT-compiles for minutes: warm it up outside the timed region.
"""
import importlib.util

import torch

from moebench.registry import Backend, register


def to_sonic_layout(w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor):
    E, D, F2 = w1_EDF2.shape
    F = F2 // 2
    w1_EDF2i = torch.stack((w1_EDF2[..., :F], w1_EDF2[..., F:]), dim=-1).reshape(E, D, F2)  # g0 u0 g1 u1 ...
    w1_F2DE = w1_EDF2i.transpose(1, 2).contiguous().permute(1, 2, 0)
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
