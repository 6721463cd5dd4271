"""liger-kernel peers: `liger_swiglu` and `liger_fused_moe`. Skipped with the reason when liger-kernel is not
installed, when this machine has no CUDA, or (fused MoE) when the installed version has no fused MoE op.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
liger_swiglu     torch._grouped_mm for the two expert GEMMs (as `grouped_mm`), with liger-kernel's fused
                 SiLU(gate) * up (LigerSiLUMulFunction) as the activation: compare it with `grouped_mm` to see
                 what the fused activation buys. Liger makes its inputs contiguous, so the gate/up halves of
                 h_SF2 are copied once; that copy is part of this backend's cost.
liger_fused_moe  liger_kernel.ops.fused_moe.LigerFusedMoEFunction (gather + grouped GEMM + SwiGLU +
                 down-proj + weighted combine; its backward recomputes instead of caching the T*K x D
                 down-proj output). Liger's layout is gate_up (E, 2F, D) with gate rows [0, F) and up rows
                 [F, 2F), and down (E, D, F): nn.Linear (out, in) storage, which moebench calls the `linear`
                 weight layout. The MoE layer stores this backend's weights that way, so the transposed views
                 passed to liger are contiguous and liger's `.contiguous()` copies nothing; weights stored
                 canonically (direct calls) are copied by liger on every call.
                 bf16 only: its tl.dot runs fp32 inputs as TF32, which cannot meet the 1e-5 fp32 parity bound.
liger-kernel is imported on first use only (the import takes seconds), never at registration.
"""
from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import torch

from implementations.routing_meta import sort_by_expert
from moebench.registry import Backend, register


def _version() -> str:
    try:
        return metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return "?"


def _installed() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed (pip install liger-kernel)"
    if not torch.cuda.is_available():
        return "liger-kernel needs CUDA (its kernels are Triton GPU kernels); no CUDA device here"
    return None


def _has_fused_moe() -> bool:
    """Whether the installed liger-kernel ships ops/fused_moe.py, found without importing the package."""
    spec = importlib.util.find_spec("liger_kernel")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(r) / "ops" / "fused_moe.py").is_file() for r in roots)


def _available_swiglu() -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    return _installed()


def _available_fused_moe() -> str | None:
    reason = _installed()
    if reason is None and not _has_fused_moe():
        reason = f"liger-kernel {_version()} has no liger_kernel.ops.fused_moe (a later version adds it)"
    return reason


def _supports_swiglu(device, dtype, shape):
    if device == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 9 and dtype == "bfloat16":
            return f"torch._grouped_mm needs compute capability >= 9.0 for bf16, this GPU is {major}.x"
    bad = [k for k in ("D", "F") if shape.get(k, 8) % 8]
    if bad:
        got = ", ".join(f"{k}={shape[k]}" for k in bad)
        return (f"liger_swiglu needs {' and '.join(bad)} to be multiples of 8 (torch._grouped_mm 16-byte "
                f"rows); got {got}")
    return None


# The imports live in two small functions so tests can stand in a plain-torch op with liger's documented
# contract and check this file's glue (layouts, dtypes) on CPU.
def _silu_mul():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return LigerSiLUMulFunction.apply


def _fused_moe():
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    return LigerFusedMoEFunction.apply


def swiglu_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    E = w1_EDF2.shape[0]
    order_S, tok_S, _, offs_E = sort_by_expert(idx_TK, E)
    h_SF2 = torch._grouped_mm(x_TD[tok_S], w1_EDF2, offs=offs_E)
    g_SF, u_SF = h_SF2.chunk(2, dim=-1)
    a_SF = _silu_mul()(g_SF, u_SF)
    o_SD = torch._grouped_mm(a_SF, w2_EFD, offs=offs_E) * p_TK.reshape(-1)[order_S].unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, o_SD)


def fused_moe_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    gate_up_EF2D = w1_EDF2.transpose(1, 2)   # (E, 2F, D): gate rows then up rows, as liger expects
    down_EDF = w2_EFD.transpose(1, 2)        # (E, D, F)
    return _fused_moe()(x_TD, gate_up_EF2D, down_EDF, idx_TK.to(torch.int32), p_TK)


register(Backend(
    name="liger_swiglu",
    forward=swiglu_forward,
    description="torch._grouped_mm GEMMs + liger-kernel's fused SiLU*mul activation (peer)",
    devices=("cuda",),
    available=_available_swiglu,
    supports=_supports_swiglu,
    host_sync=lambda device, dtype: None if device == "cuda" and dtype == "bfloat16" else
    "its torch._grouped_mm GEMMs fall back to a per-group loop with a host sync here",
))

register(Backend(
    name="liger_fused_moe",
    forward=fused_moe_forward,
    description="liger-kernel's fused MoE (liger_kernel.ops.fused_moe: gather+grouped GEMM+SwiGLU, "
                "recomputing backward; weights stored nn.Linear-style, its own layout) (peer)",
    devices=("cuda",),
    dtypes=("bfloat16",),
    available=_available_fused_moe,
    weight_layout="linear",
    host_sync="not verified free of host syncs under CUDA graphs (peer)",
))
