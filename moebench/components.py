"""Interchangeable model components: attention kernels and RMSNorm implementations, each with a reason
when it cannot run here (the case is then `skipped` with that reason, never run on something else).

attention: math (explicit QK^T, softmax, AV) | sdpa (PyTorch picks) | sdpa-flash | sdpa-cudnn |
           sdpa-efficient (SDPA restricted to that one kernel) | flash-attn (the flash-attn package)
norm:      torch (plain ops) | liger (liger-kernel's LigerRMSNorm) | triton (moebench's own fused kernel,
           implementations/triton_rmsnorm.py)

Availability is probed, not guessed: why_not() runs the component once on tiny random inputs on the case's
device and dtype (cached per process) and returns the first line of the error when it fails.
Legend: B batch, H heads, S seq, Dh head dim, D model dim.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTIONS = ("math", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn")
NORMS = ("torch", "liger", "triton")
_SDPA_KERNEL = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- attention
def _math_attention(q_BHSDh, k_BHSDh, v_BHSDh):
    S = q_BHSDh.shape[-2]
    scores = (q_BHSDh @ k_BHSDh.transpose(-1, -2)) / math.sqrt(q_BHSDh.shape[-1])
    mask = torch.ones(S, S, dtype=torch.bool, device=q_BHSDh.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1).to(v_BHSDh.dtype) @ v_BHSDh


def _sdpa(kernel: str | None):
    def attend(q_BHSDh, k_BHSDh, v_BHSDh):
        if kernel is None:
            return F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
    return attend


def _flash_attn(q_BHSDh, k_BHSDh, v_BHSDh):
    from flash_attn import flash_attn_func  # takes (B, S, H, Dh)
    o_BSHDh = flash_attn_func(q_BHSDh.transpose(1, 2), k_BHSDh.transpose(1, 2), v_BHSDh.transpose(1, 2),
                              causal=True)
    return o_BSHDh.transpose(1, 2)


def attention_fn(name: str):
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention '{name}'; valid: {', '.join(ATTENTIONS)}")
    if name == "math":
        return _math_attention
    if name == "flash-attn":
        return _flash_attn
    return _sdpa(_SDPA_KERNEL.get(name))


# ----------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """The plain-ops reference: fp32 statistics, normalised x cast back to x's dtype, times the weight."""

    def __init__(self, D: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _liger_norm(D: int, eps: float) -> nn.Module:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    # casting_mode "llama" is the reference's numerics (fp32 stats, cast, then weight). in_place=False: the
    # default in-place backward overwrites dY, which is wrong whenever dY is read again (liger's own docs).
    kw = {"eps": eps}
    params = inspect.signature(LigerRMSNorm.__init__).parameters
    if "casting_mode" in params:
        kw["casting_mode"] = "llama"
    if "in_place" in params:
        kw["in_place"] = False
    return LigerRMSNorm(D, **kw)


def norm(name: str, D: int, eps: float) -> nn.Module:
    if name == "torch":
        return RMSNorm(D, eps)
    if name == "liger":
        return _liger_norm(D, eps)
    if name == "triton":
        from implementations.triton_rmsnorm import TritonRMSNorm
        return TritonRMSNorm(D, eps)
    raise ValueError(f"unknown norm '{name}'; valid: {', '.join(NORMS)}")


# -------------------------------------------------------------------------------------------- why_not
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


@functools.lru_cache(maxsize=None)
def _probe_attention(name: str, device: str, dtype: str) -> str | None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=g).to(device, _DTYPES[dtype]) for _ in range(3))
    try:
        out = attention_fn(name)(q, k, v)
        ref = _math_attention(q.double(), k.double(), v.double())
        err = ((out.double() - ref).norm() / ref.norm()).item()
    except Exception as e:  # noqa: BLE001 - the reason is the point
        return f"attention '{name}' cannot run on {device}/{dtype}: {_first_line(e)}"
    if not err <= (1e-5 if dtype == "float32" else 2e-2):
        return f"attention '{name}' on {device}/{dtype} disagrees with math attention (rel err {err:.2g})"
    return None


@functools.lru_cache(maxsize=None)
def _probe_norm(name: str, device: str, dtype: str, interpret: bool) -> str | None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 96, generator=g).to(device, _DTYPES[dtype]).requires_grad_()
    try:
        mod = norm(name, 96, 1e-5).to(device, _DTYPES[dtype])
        mod(x).float().square().sum().backward()
    except Exception as e:  # noqa: BLE001
        return f"norm '{name}' cannot run on {device}/{dtype}: {_first_line(e)}"
    return None


def why_not(attention: str, norm_name: str, device: str, dtype: str) -> str | None:
    """None when this attention + norm combination can run on device/dtype, else a one-line reason."""
    if attention not in ATTENTIONS:
        return f"unknown attention '{attention}'; valid: {', '.join(ATTENTIONS)}"
    if norm_name not in NORMS:
        return f"unknown norm '{norm_name}'; valid: {', '.join(NORMS)}"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA requested but torch.cuda.is_available() is False"
    if attention == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn not installed"
        if device != "cuda":
            return "attention 'flash-attn' needs CUDA"
    if attention not in ("math", "sdpa") or device == "cuda":
        reason = _probe_attention(attention, device, dtype)
        if reason:
            return reason
    if norm_name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if device != "cuda":
            return "norm 'liger' needs CUDA (liger-kernel's Triton kernels)"
    if norm_name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton not installed"
        if device != "cuda" and not _interpret():
            return "norm 'triton' needs CUDA, or TRITON_INTERPRET=1 on CPU"
    if norm_name != "torch":
        return _probe_norm(norm_name, device, dtype, _interpret())
    return None
