"""torchao peer: `torchao_fp8`, torchao's MoE FP8 training path (torchao.prototype.moe_training: a differentiable
fp8 rowwise scaled grouped GEMM that quantises its inputs dynamically) for both expert GEMMs, with moebench's own
routing glue (sort by expert, gather, SwiGLU, weighted combine). Skipped with the reason when torchao (or its
moe_training prototype) is not installed, without CUDA, or below compute capability 9.0.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
gemm_dtype  "fp8-rowwise-fp8bwd" only: torchao's recipe quantises the backward GEMMs to e4m3 too (grad_out rowwise
            for dgrad; per-expert-group column scales over the tokens for wgrad), power-of-two scales as moebench's
            (moebench/quant.py), so parity checks it against moebench/fp8ref.py with that backward. Its forward is
            the same quantisation as grouped_mm's "fp8-rowwise".
Layout      torchao wants the right operand column-major (E, K, N) with strides (K*N, 1, K): nn.Linear storage, which
            moebench calls the `linear` weight layout; the MoE layer stores this backend's weights that way, so no
            per-step transpose copy is made (torchao's own column-major copies inside its kernels are its cost).
Entry point the first of _to_fp8_rowwise_then_scaled_grouped_mm, _quantize_then_scaled_grouped_mm, _scaled_grouped_mm
            found in torchao.prototype.moe_training (the name moved between torchao releases); the one used is the
            record's backend_path. torchao is imported on first use only, never at registration.
"""
from __future__ import annotations

import functools

import importlib.util
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from implementations.routing_meta import sort_by_expert
from moebench.registry import Backend, register

GEMM = "fp8-rowwise-fp8bwd"
ENTRY_POINTS = ("_to_fp8_rowwise_then_scaled_grouped_mm", "_quantize_then_scaled_grouped_mm", "_scaled_grouped_mm")


def _version() -> str:
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return "?"


def _has_moe_training() -> bool:
    spec = importlib.util.find_spec("torchao")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(r) / "prototype" / "moe_training").is_dir() for r in roots)


def _available() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed (pip install torchao)"
    if not _has_moe_training():
        return f"torchao {_version()} has no torchao.prototype.moe_training (its MoE fp8 training path)"
    if not torch.cuda.is_available():
        return "torchao's fp8 grouped GEMM needs CUDA; no CUDA device here"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"torchao's fp8 rowwise grouped GEMM needs compute capability >= 9.0, this GPU is {major}.{minor}"
    return None


def _supports(device, dtype, shape):
    bad = [k for k in ("D", "F") if shape.get(k, 16) % 16]
    if bad:
        got = ", ".join(f"{k}={shape[k]}" for k in bad)
        return f"torchao's fp8 grouped GEMM needs {' and '.join(bad)} to be multiples of 16; got {got}"
    return None


@functools.cache  # looked up once, not inside every timed step
def scaled_grouped_mm():
    """(name, fn): torchao's differentiable fp8 rowwise grouped GEMM, fn(A_SK, B_t_EKN, offs=, out_dtype=)."""
    import torchao.prototype.moe_training as mt

    for name in ENTRY_POINTS:
        fn = getattr(mt, name, None)
        if fn is not None:
            return name, fn
    raise ImportError(f"torchao {_version()}: none of {', '.join(ENTRY_POINTS)} in torchao.prototype.moe_training")


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, gemm_dtype=GEMM):
    if gemm_dtype != GEMM:
        raise ValueError(f"torchao_fp8 runs gemm_dtype '{GEMM}' only, not '{gemm_dtype}'")
    _, mm = scaled_grouped_mm()
    E = w1_EDF2.shape[0]
    order_S, tok_S, _, offs_E = sort_by_expert(idx_TK, E)
    h_SF2 = mm(x_TD[tok_S], w1_EDF2, offs=offs_E, out_dtype=torch.bfloat16)
    g_SF, u_SF = h_SF2.chunk(2, dim=-1)
    a_SF = (F.silu(g_SF) * u_SF).contiguous()
    o_SD = mm(a_SF, w2_EFD, offs=offs_E, out_dtype=torch.bfloat16) * p_TK.reshape(-1)[order_S].unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, o_SD.to(x_TD.dtype))


def _path(device: str, dtype: str, gemm_dtype: str = GEMM) -> str:
    try:
        name = scaled_grouped_mm()[0]
    except ImportError as e:
        name = f"unavailable ({e})"
    return f"torchao {_version()} torchao.prototype.moe_training.{name} (fp8 rowwise, fp8 backward)"


register(Backend(
    name="torchao_fp8",
    forward=forward,
    description="torchao's MoE fp8 training path (prototype.moe_training fp8 rowwise scaled grouped GEMM, fp8 "
                "backward) for both expert GEMMs (peer)",
    devices=("cuda",),
    dtypes=("bfloat16",),
    available=_available,
    supports=_supports,
    weight_layout="linear",
    gemm_dtypes=(GEMM,),
    host_sync="not verified free of host syncs under CUDA graphs (peer; newer torchao pads token groups)",
    path=_path,
))
