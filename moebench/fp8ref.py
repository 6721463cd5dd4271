"""The fp8-rowwise reference: implementations/naive.py's per-expert loop (naive.forward itself) with both expert
GEMMs replaced by the quantised GEMM of moebench/quant.py, computed in the precision of its inputs (fp32 in parity). It is what an fp8
backend is checked against (moebench/core/parity.py): the same quantisation, then the MoE in fp32.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N rows routed to one expert.
  h_NF2 = fq(x_ND, rows) @ fq(w1_DF2, columns);  a_NF = silu(g_NF) * u_NF;  o_ND = fq(a_NF, rows) @ fq(w2_FD, columns)
  y_TD[t] = sum_k p_TK[t, k] * o[t, k]
Per-row and per-column scales do not depend on how rows are grouped, so this loop and a grouped GEMM over
expert-sorted rows quantise every value identically (the e4m3 backward's per-group scales: one loop step is one
group). Backward: gemm_dtype's (quant.fp8_matmul): "fp8-rowwise" straight-through, as the bf16 backward of the fp8
backends (the unquantised GEMMs' gradients, through the activation at its quantised-forward value);
"fp8-rowwise-fp8bwd" e4m3 backward GEMMs.
`round_to` (e.g. torch.bfloat16) rounds the values a bf16-carrying backend holds in bf16 between the GEMMs (the
GEMM outputs and the activation, and in backward their gradients); parity uses it to measure how far the reference itself moves at that precision.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from moebench.quant import fp8_matmul


def _round(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).to(t.dtype)


def _expert(x_ND, w1_DF2, w2_FD, gemm_dtype: str, round_to: torch.dtype | None):
    """One expert's SwiGLU with both GEMMs quantised (naive's swiglu_expert, fp8)."""
    g_NF, u_NF = _round(fp8_matmul(x_ND, w1_DF2, gemm_dtype), round_to).chunk(2, dim=-1)
    a_NF = _round(F.silu(g_NF) * u_NF, round_to)
    return _round(fp8_matmul(a_NF, w2_FD, gemm_dtype), round_to)


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, gemm_dtype: str = "fp8-rowwise", round_to: torch.dtype | None = None):
    from implementations.naive import forward as naive_forward  # the loop itself: one copy, naive's
    return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD,
                         expert=partial(_expert, gemm_dtype=gemm_dtype, round_to=round_to))
