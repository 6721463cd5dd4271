"""naive: a per-expert Python loop over a mask. THE reference every other backend is checked against.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
y_TD[t] = sum_k p_TK[t, k] * SwiGLU_{idx_TK[t, k]}(x_TD[t]),  SwiGLU_e(x) = (silu(x W_g) * (x W_u)) W2_e
with W_g = w1_EDF2[e, :, :F] and W_u = w1_EDF2[e, :, F:].
"""
import torch
import torch.nn.functional as F

from moebench.registry import Backend, register


def swiglu_expert(x_ND: torch.Tensor, w1_DF2: torch.Tensor, w2_FD: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP on a block of rows. Shared by the loop backends."""
    h_NF2 = x_ND @ w1_DF2
    g_NF, u_NF = h_NF2.chunk(2, dim=-1)
    return (F.silu(g_NF) * u_NF) @ w2_FD


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, expert=swiglu_expert):
    """expert(x_ND, w1_DF2, w2_FD): one expert's MLP (moebench/fp8ref.py passes a quantised one)."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EDF2.shape[0]):
        tok_N, slot_N = torch.where(idx_TK == e)  # a host sync per expert: part of being naive
        if tok_N.numel() == 0:
            continue
        out_ND = expert(x_TD[tok_N], w1_EDF2[e], w2_EFD[e])
        y_TD = y_TD.index_add(0, tok_N, out_ND * p_TK[tok_N, slot_N].unsqueeze(-1))
    return y_TD


register(Backend(
    name="naive",
    forward=forward,
    description="per-expert Python loop over a routing mask (the reference)",
    host_sync="torch.where per expert reads the routing back to the host",
))
