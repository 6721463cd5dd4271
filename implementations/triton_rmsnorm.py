"""TritonRMSNorm: moebench's own fused RMSNorm in Triton, forward and backward (the `triton` norm).

Legend: N rows (every leading dim flattened), D model dim, P backward programs.
  forward   rstd_N = 1 / sqrt(mean_D(x_ND^2) + eps),  y_ND = x_ND * rstd_N * w_D   (fp32 math, y in x's dtype)
  backward  xhat = x * rstd, g = dy * w:   dx = rstd * (g - xhat * mean_D(g * xhat))
            dw = sum_N(dy * xhat): each of P programs sums its block of rows in fp32, then one torch.sum.
One program per row in the forward (the row lives in registers: D <= 65536); rstd_N is saved for the backward.
Kernels are built on first use, because Triton decides GPU vs interpreter when a kernel is decorated:
importing this module never imports triton, and TRITON_INTERPRET=1 runs the same kernels on CPU tensors.
Written against the triton.language core that triton 3.x keeps stable (load/store/reduce/sqrt/while); runs under
the interpreters of triton 3.6 and 3.9.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

MAX_D = 65536


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Kernel bodies: plain functions here, jitted by _kernels() on first use. They use core builtins only (no
# tl.sum / tl.zeros: those are @jit functions of triton's standard library, decorated in whatever mode triton
# was first imported in, so they break a kernel built in the other mode). `tl` and `_add` are module globals
# that _kernels() binds before jitting (Triton resolves a kernel's names in its module's globals).
tl = None     # triton.language, bound by _kernels()
_add = None   # triton.jit(_add_fn), bound by _kernels()


def _add_fn(a, b):
    return a + b


def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 0, _add) / D + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PD, stride_dy, stride_x, stride_dx, N, D, rows_per_prog,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK_D,), 0.0, tl.float32)
    r = pid.to(tl.int64) * rows_per_prog  # int64 row index
    end = tl.minimum(r + rows_per_prog, N)
    # a while loop, not range(r, end): triton 3.6's interpreter turns range() bounds into ints with int() of a
    # 1-element array, which numpy >= 2.4 refuses (fixed in triton 3.7); a while condition is a plain bool there
    while r < end:
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        g = dy * w
        c = tl.reduce(g * xhat, 0, _add) / D
        tl.store(DX + r * stride_dx + cols, (rstd * (g - xhat * c)).to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        r += 1
    tl.store(DW_PD + pid.to(tl.int64) * D + cols, dw, mask=mask)


_BUILT: dict = {}


def _kernels():
    """(fwd, bwd, next_power_of_2) jitted for the current mode (GPU or interpreter); rebuilt on a change."""
    mode = _interpret()
    if _BUILT.get("mode") is not mode:
        import triton
        import triton.language
        g = globals()
        g["tl"] = triton.language
        g["_add"] = triton.jit(_add_fn)
        _BUILT.clear()
        kernels = (triton.jit(_rmsnorm_fwd), triton.jit(_rmsnorm_bwd), triton.next_power_of_2)
        _BUILT.update(mode=mode, k=kernels)
    return _BUILT["k"]


def _check(x: torch.Tensor, D: int) -> None:
    if x.device.type != "cuda" and not _interpret():
        raise RuntimeError(f"TritonRMSNorm on {x.device.type} needs CUDA, or TRITON_INTERPRET=1 on CPU")
    if D > MAX_D:
        raise ValueError(f"TritonRMSNorm keeps a row in registers: D must be <= {MAX_D}, got {D}")


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _n_programs(N: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(N, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(N, 4))


class TritonRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        D = x.shape[-1]
        _check(x, D)
        fwd, _, next_pow2 = _kernels()
        x_ND = x.reshape(-1, D).contiguous()
        N = x_ND.shape[0]
        y_ND = torch.empty_like(x_ND)
        rstd_N = torch.empty(N, dtype=torch.float32, device=x.device)
        block = next_pow2(D)
        if N:
            fwd[(N,)](x_ND, weight, y_ND, rstd_N, x_ND.stride(0), y_ND.stride(0), D, eps,
                      BLOCK_D=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x_ND, weight, rstd_N)
        ctx.block, ctx.shape = block, x.shape
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_ND, weight, rstd_N = ctx.saved_tensors
        _, bwd, _ = _kernels()
        N, D = x_ND.shape
        dy_ND = dy.reshape(-1, D).contiguous()
        dx_ND = torch.empty_like(x_ND)
        P = _n_programs(N, x_ND.device)
        dw_PD = torch.zeros(P, D, dtype=torch.float32, device=x_ND.device)
        if N:
            rows_per_prog = -(-N // P)
            bwd[(P,)](dy_ND, x_ND, weight, rstd_N, dx_ND, dw_PD, dy_ND.stride(0), x_ND.stride(0),
                      dx_ND.stride(0), N, D, rows_per_prog,
                      BLOCK_D=ctx.block, num_warps=_num_warps(ctx.block))
        return dx_ND.view(ctx.shape), dw_PD.sum(0).to(weight.dtype), None


def triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return TritonRMSNormFunction.apply(x, weight, eps)


class TritonRMSNorm(nn.Module):
    """Drop-in for moebench.components.RMSNorm (same parameter `weight`, same eps)."""

    def __init__(self, D: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x):
        return triton_rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
