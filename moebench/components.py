"""Interchangeable model components: attention kernels and RMSNorm implementations, each with a reason
when it cannot run here (the case is then `skipped` with that reason).

attention: math (explicit QK^T, softmax, AV) | sdpa (PyTorch picks) | sdpa-flash | sdpa-cudnn |
           sdpa-efficient (SDPA restricted to one kernel) | flash-attn (the flash-attn package)
norm:      torch (plain ops) | liger (liger-kernel's LigerRMSNorm) | triton (moebench's own fused kernel)
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _math_attention(q, k, v):
    S = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def _sdpa(backend_name: str | None):
    def attend(q, k, v):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_func
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def attention_fn(name: str):
    return {"math": _math_attention, "sdpa": _sdpa(None), "sdpa-flash": _sdpa("FLASH_ATTENTION"),
            "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"), "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
            "flash-attn": _flash_attn}[name]


class RMSNorm(nn.Module):
    def __init__(self, D: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def norm(name: str, D: int, eps: float) -> nn.Module:
    if name == "torch":
        return RMSNorm(D, eps)
    if name == "liger":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        return LigerRMSNorm(D, eps=eps)
    if name == "triton":
        from implementations.triton_rmsnorm import TritonRMSNorm
        return TritonRMSNorm(D, eps)
    raise ValueError(f"unknown norm '{name}'")


def why_not(attention: str, norm_name: str, device: str, dtype: str) -> str | None:
    """None when this attention + norm combination can run on device/dtype, else a one-line reason."""
    if attention in ("sdpa-flash", "sdpa-cudnn", "flash-attn") and device != "cuda":
        return f"attention '{attention}' needs CUDA"
    if attention in ("sdpa-flash", "sdpa-cudnn", "flash-attn") and dtype == "float32":
        return f"attention '{attention}' needs bf16/fp16, not float32"
    if attention == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    if norm_name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if device != "cuda":
            return "norm 'liger' needs CUDA"
    if norm_name == "triton":
        import os
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "norm 'triton' needs CUDA or TRITON_INTERPRET=1"
        if importlib.util.find_spec("implementations.triton_rmsnorm") is None:
            return "moebench's triton RMSNorm is not built yet"
    return None
