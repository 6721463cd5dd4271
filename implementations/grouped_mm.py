"""grouped_mm: torch._grouped_mm over expert-sorted rows (the torchtitan path).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
torch._grouped_mm needs row strides that are multiples of 16 bytes. When F (or D) is not a multiple of
16 bytes' worth of elements, the weights are zero-padded (gate/up columns, w2 rows, x columns): silu(0)*0 = 0
and zero rows add nothing, so the result is exactly the unpadded one. The padding copy is part of this
backend's cost and is timed with it.
gemm_dtype "fp8-rowwise": both expert GEMMs through torch._scaled_grouped_mm with e4m3 operands quantised inside the
step (implementations/fp8_grouped.py: rowwise activations, per-column weights, bf16 backward); padded to 16
elements. Where this torch or GPU has no fp8 grouped GEMM the case is `skipped` with the reason, never run in bf16.
"""
import torch
import torch.nn.functional as F

from implementations import fp8_grouped
from implementations.routing_meta import sort_by_expert
from moebench.registry import Backend, folded, register

GEMM_DTYPES = ("default", "fp8-rowwise")


def _align(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, gemm_dtype="default"):
    E, D, F2 = w1_EDF2.shape
    Fh = F2 // 2
    fp8 = gemm_dtype == "fp8-rowwise"
    if gemm_dtype not in GEMM_DTYPES:
        raise ValueError(f"grouped_mm: gemm_dtype '{gemm_dtype}' is not one of {', '.join(GEMM_DTYPES)}")
    mm = fp8_grouped.grouped_mm_fp8 if fp8 else torch._grouped_mm
    a = fp8_grouped.ALIGN if fp8 else _align(x_TD.dtype)
    pad_F, pad_D = (-Fh) % a, (-D) % a
    if pad_F:
        g_EDF, u_EDF = w1_EDF2.chunk(2, dim=-1)
        w1_EDF2 = torch.cat([F.pad(g_EDF, (0, pad_F)), F.pad(u_EDF, (0, pad_F))], dim=-1)
        w2_EFD = F.pad(w2_EFD, (0, 0, 0, pad_F))
    if pad_D:
        x_TD = F.pad(x_TD, (0, pad_D))
        w1_EDF2 = F.pad(w1_EDF2, (0, 0, 0, pad_D))
        w2_EFD = F.pad(w2_EFD, (0, pad_D))
    order_S, tok_S, _, offs_E = sort_by_expert(idx_TK, E)
    h_SF2 = mm(x_TD[tok_S], w1_EDF2, offs=offs_E)
    g_SF, u_SF = h_SF2.chunk(2, dim=-1)
    a_SF = (F.silu(g_SF) * u_SF).contiguous()
    o_SD = mm(a_SF, w2_EFD, offs=offs_E) * p_TK.reshape(-1)[order_S].unsqueeze(-1)
    y_TD = torch.zeros_like(x_TD).index_add_(0, tok_S, o_SD)
    return y_TD[:, :D] if pad_D else y_TD


def _available():
    return None if hasattr(torch, "_grouped_mm") else f"torch {torch.__version__} has no torch._grouped_mm"


def _fast(device: str, dtype: str) -> bool:
    """torch._grouped_mm's own kernel runs for bf16 on sm90+ (CUTLASS); elsewhere on CUDA it loops over the groups
    with a host sync (its fallback)."""
    return device == "cuda" and dtype == "bfloat16" and torch.cuda.is_available() \
        and torch.cuda.get_device_capability()[0] >= 9


def _path(device: str, dtype: str, gemm_dtype: str = "default") -> str:
    if gemm_dtype == "fp8-rowwise":
        return ("torch._scaled_grouped_mm fp8 rowwise (CUTLASS, sm90+), quantisation in PyTorch ops inside the step; "
                "backward: torch._grouped_mm in bf16")
    if device != "cuda":
        return "torch._grouped_mm on CPU (a loop over the groups)"
    return ("torch._grouped_mm CUTLASS grouped GEMM (bf16, sm90+)" if _fast(device, dtype)
            else f"torch._grouped_mm fallback: a loop over the groups with a host sync ({dtype})")


def _host_sync(device: str, dtype: str, gemm_dtype: str = "default") -> str | None:
    if gemm_dtype == "fp8-rowwise":
        return None  # where the fp8 kernel runs at all (_supports), it does not sync
    if device == "cuda" and not _fast(device, dtype):
        return f"torch._grouped_mm falls back to a per-group loop with a host sync for {dtype} on this GPU"
    return None


def _supports(device, dtype, shape):
    if shape.get("gemm_dtype") == "fp8-rowwise":
        return fp8_grouped.why_not(device, dtype)
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
        if major < 9 and dtype == "bfloat16":
            return f"torch._grouped_mm needs compute capability >= 9.0 on CUDA, this GPU is {major}.x"
    return None


GROUPED_MM = register(Backend(
    name="grouped_mm",
    forward=forward,
    description="torch._grouped_mm on expert-sorted rows (PyTorch native, torchtitan path)",
    available=_available,
    supports=_supports,
    host_sync=_host_sync,
    path=_path,
    gemm_dtypes=GEMM_DTYPES,
))
register(folded(GROUPED_MM))  # grouped_mm+shared: shared experts as always-on experts
