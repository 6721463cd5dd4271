"""FP8 e4m3 rowwise quantisation: one definition shared by the fp8 backends (their steps quantise with these functions,
inside the timed step) and the fp32 parity reference (moebench/fp8ref.py), so "the same quantisation" is the same code.

Legend: N rows, K the reduced (contraction) dim, M output columns; E experts, D model dim, F expert hidden,
S = T*K slots. `s` is always a DEQUANT scale: x ~= q * s (as torch._scaled_mm / _scaled_grouped_mm take it).

Scheme of gemm_dtype "fp8-rowwise" (moebench.gemm_dtypes.GEMM_DTYPES):
  activations   one scale per row: a token's row of x_TD (first GEMM), a slot's row of a_SF (second GEMM)
  weights       one scale per output column of each expert: w1_EDF2 -> (E, 2F) scales over D, w2_EFD -> (E, D)
                scales over F (the reduced dim K is the one each scale spans, so q_a @ q_b * s_a s_b is exact algebra)
  scales        fp32, from amax = max |x| over the reduced dim, rounded up to a power of two: s = 2^k, the
                smallest with amax / s <= 448 (e4m3's largest finite value), so amax / s lies in (224, 448].
                Why: dividing by a power of two is exact in every binary float format, so (1) the only error is
                e4m3's rounding, (2) the quantised values of a bf16 input are the same bits whether computed in bf16
                on a GPU or in fp32 on a CPU (the backend and the reference agree exactly on identical inputs), and
                (3) no clamp is needed: x / s can never exceed 448. Cost: up to one bit of e4m3 range unused.
  rounding      round-to-nearest-even to e4m3 (torch's cast); never NaN (no value beyond 448 reaches the cast)
  zero rows     amax floored at AMAX_FLOOR, so a zero row gets a finite scale and quantises to zeros (no 0/0)
Round-trip bound (tests/test_quant.py): |q*s - x| <= 2^-4 |x| where |x|/s >= 2^-6 (e4m3 normals: 3 mantissa bits, half
an ulp is 2^-4 relative), and <= 2^-10 s below that (subnormal spacing 2^-9).
Backward of the quantised GEMM (fp8_matmul), by gemm dtype:
  "fp8-rowwise"         straight-through: the unquantised GEMM's gradients, in the workload dtype (bf16) on the saved
                        unquantised operands (implementations/fp8_grouped.py)
  "fp8-rowwise-fp8bwd"  both backward GEMMs in e4m3 too (torchao's fp8 rowwise MoE recipe): dA = q(dY, rows) @
                        q(B^T, columns) and dB = q(A^T, rows) @ q(dY, columns), every scale over that GEMM's reduced
                        dim (for dB: the rows of one expert's group)
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0                 # largest finite e4m3fn value (0.875 * 2^9)
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_REL_HALF_ULP = 2.0 ** -4    # 3 mantissa bits: half an ulp relative to a normal value, at most
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10
AMAX_FLOOR = 2.0 ** -100         # a zero row's amax is taken as this: finite scale, zero codes


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """fp32 dequant scale from amax: 2^k, the smallest power of two with amax / 2^k <= 448, found exactly with
    frexp (amax = m * 2^e, m in [0.5, 1): k = e - 9, or e - 8 when m > 0.875 = 448 / 2^9), no log2 rounding."""
    m, e = torch.frexp(amax.float().clamp(min=AMAX_FLOOR))
    k = e - 9 + (m > 0.875).to(e.dtype)
    return torch.exp2(k.float())


def quantize(x: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): q = e4m3(x / s) with one fp32 scale per slice along `dim` (the reduced dim: -1 for the rows of an
    activation, -2 for the output columns of a (..., K, M) weight); s keeps `dim` as size 1. q keeps x's strides,
    or is `out` (an e4m3 tensor of x's shape in any memory layout, e.g. column-major: the cast and the transpose
    are then one copy). x / s is computed in x's own dtype (exact: s is a power of two)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=dim, keepdim=True)
    s = scale_of(amax)
    v = x * (1.0 / s).to(x.dtype)
    return (v.to(E4M3) if out is None else out.copy_(v)), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * s).to(dtype)


def fake_quant(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x rounded through e4m3 and back, in x's dtype (exact in fp32: an e4m3 value times a power of two)."""
    q, s = quantize(x, dim)
    return dequantize(q, s, x.dtype)


BACKWARDS = {"fp8-rowwise": "straight", "fp8-rowwise-fp8bwd": "e4m3"}


class _QuantMatmul(torch.autograd.Function):
    """y = fq(a, rows) @ fq(b, columns); backward: straight-through, or e4m3 GEMMs (module docstring)."""

    @staticmethod
    def forward(ctx, a_NK, b_KM, bwd):
        ctx.save_for_backward(a_NK, b_KM)
        ctx.bwd = bwd
        return fake_quant(a_NK, -1) @ fake_quant(b_KM, -2)

    @staticmethod
    def backward(ctx, dy_NM):
        a_NK, b_KM = ctx.saved_tensors
        if ctx.bwd == "straight":
            return dy_NM @ b_KM.transpose(-2, -1), a_NK.transpose(-2, -1) @ dy_NM, None
        da_NK = fake_quant(dy_NM, -1) @ fake_quant(b_KM, -1).transpose(-2, -1)   # reduced dim M
        db_KM = fake_quant(a_NK, -2).transpose(-2, -1) @ fake_quant(dy_NM, -2)   # reduced dim N
        return da_NK, db_KM, None


def fp8_matmul(a_NK: torch.Tensor, b_KM: torch.Tensor, gemm_dtype: str = "fp8-rowwise") -> torch.Tensor:
    """The quantised GEMM in the input's precision: rowwise-quantised a times columnwise-quantised b, accumulated in
    a's dtype; the backward of `gemm_dtype` (BACKWARDS)."""
    if gemm_dtype not in BACKWARDS:
        raise ValueError(f"gemm_dtype '{gemm_dtype}' is not one of {', '.join(BACKWARDS)}")
    return _QuantMatmul.apply(a_NK, b_KM, BACKWARDS[gemm_dtype])
