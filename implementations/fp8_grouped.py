"""The fp8-rowwise grouped GEMM of `grouped_mm` (gemm_dtype "fp8-rowwise"): torch._scaled_grouped_mm over
expert-sorted rows, quantising inside the step with moebench/quant.py. Not a backend of its own (nothing registered
here): implementations/grouped_mm.py calls it.

Legend: S = T*K slots (rows, sorted by expert), K the reduced dim, N output columns, E experts.
Forward   a_SK -> e4m3 with one scale per row, b_EKN -> e4m3 with one scale per (expert, output column), both
          dynamic (amax of this step's values, power-of-two scales: moebench/quant.py), then
          torch._scaled_grouped_mm(q_a row-major, q_b column-major, s_a (S,), s_b (E, N), offs) -> bf16, fp32
          accumulation (use_fast_accum: Hopper's faster fp8 accumulation, as torchao's forward uses).
          The quantisation kernels (amax, scale, the scaled values, their cast, for b into column-major order in
          the same copy) are plain PyTorch ops in the timed step: nothing is left out or cached across steps.
Backward  in bf16, NOT fp8: da = dy @ b^T and db = a^T @ dy with torch._grouped_mm on the saved unquantised bf16
          operands (straight-through; moebench/fp8ref.py computes the same gradients in fp32).
Needs     CUDA with compute capability >= 9.0 (the CUTLASS fp8 grouped kernel) and a torch that has
          torch._scaled_grouped_mm; K and N multiples of 16 (the caller pads with zeros, which quantise to zeros).
"""
from __future__ import annotations

import torch

from moebench import quant

ALIGN = 16  # elements: e4m3 rows of K and the column-major b need 16-byte strides


def scaled_op():
    """torch._scaled_grouped_mm (a seam: CPU tests stand in an emulation with the same contract)."""
    return torch._scaled_grouped_mm


class Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_SK, b_EKN, offs_E):
        E, K, N = b_EKN.shape
        qa_SK, sa_S1 = quant.quantize(a_SK.contiguous(), -1)
        col_major = torch.empty(E, N, K, dtype=quant.E4M3, device=b_EKN.device).transpose(-2, -1)
        qb_EKN, sb_E1N = quant.quantize(b_EKN, -2, out=col_major)  # cast and transpose in one copy
        ctx.save_for_backward(a_SK, b_EKN, offs_E)
        return scaled_op()(qa_SK, qb_EKN, sa_S1.reshape(-1), sb_E1N.squeeze(-2).contiguous(),
                           offs=offs_E, out_dtype=torch.bfloat16, use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy_SN):
        a_SK, b_EKN, offs_E = ctx.saved_tensors
        dy_SN = dy_SN.to(a_SK.dtype).contiguous()
        da_SK = torch._grouped_mm(dy_SN, b_EKN.transpose(-2, -1), offs=offs_E) if ctx.needs_input_grad[0] else None
        db_EKN = torch._grouped_mm(a_SK.t(), dy_SN, offs=offs_E) if ctx.needs_input_grad[1] else None
        return da_SK, db_EKN, None


def grouped_mm_fp8(a_SK: torch.Tensor, b_EKN: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a_SK, b_EKN, offs=offs) with fp8-rowwise operands (forward) and a bf16 backward."""
    return Fp8GroupedMM.apply(a_SK, b_EKN, offs)


def why_not(device: str, dtype: str) -> str | None:
    """None when this torch and GPU can run the fp8 grouped GEMM, else why not."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm (fp8 grouped GEMM)"
    if device != "cuda":
        return "torch._scaled_grouped_mm (fp8 grouped GEMM) runs on CUDA only; this case is on CPU"
    if not torch.cuda.is_available():
        return "torch._scaled_grouped_mm needs CUDA; torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"torch._scaled_grouped_mm (fp8 rowwise) needs compute capability >= 9.0, this GPU is {major}.{minor}"
    if dtype != "bfloat16":
        return f"the fp8 grouped GEMM returns bf16: it takes workload dtype bfloat16, not {dtype}"
    return None
