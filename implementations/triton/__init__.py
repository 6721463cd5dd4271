"""Own Triton kernels for the dropless SwiGLU expert block (forward + backward). Registers `triton`.

Nothing here imports triton or compiles anything at import time: kernels are built on first use.
On CPU the kernels run under Triton's interpreter (slow; for tests), only when TRITON_INTERPRET=1.
"""
import importlib.util
import os

from moebench.registry import Backend, folded, register


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _available():
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    import torch
    if not torch.cuda.is_available() and not _interpret():
        return "triton kernels need CUDA or TRITON_INTERPRET=1"
    return None


def _supports(device, dtype, shape):
    if device == "cpu" and not _interpret():
        return "triton kernels run on CPU only under TRITON_INTERPRET=1"
    if device == "cuda":
        import torch
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8 and dtype == "bfloat16":
            return "triton bf16 kernels need compute capability >= 8.0"
    return None


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, recompute=100, wdesc=True, pregather="auto"):
    from implementations.triton.moe import moe_forward
    return moe_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, recompute=recompute, wdesc=wdesc, pregather=pregather)


def _validate(options: dict) -> str | None:
    rc = options.get("recompute", 100)
    if rc not in (0, 100) or isinstance(rc, bool):
        return f"recompute must be 0 (keep inputs only) or 100 (keep gate/up pre-activations), got {rc!r}"
    pg = options.get("pregather", "auto")
    if pg not in ("auto", "on", "off"):
        return f"pregather must be auto, on or off, got {pg!r}"
    return None


TRITON = register(Backend(
    name="triton",
    forward=forward,
    description="own Triton kernels: gather fused into grouped GEMM + SwiGLU epilogue + slot-order combine, "
                "fused backward (recompute 0 keeps inputs only, 100 keeps gate/up pre-activations); options "
                "wdesc (weights by tensor descriptor in the gathering GEMMs) and pregather (auto|on|off: copy x[tok] "
                "to sorted order first) switch code paths for A/B runs",
    devices=("cuda", "cpu"),
    options={"recompute": 100, "wdesc": True, "pregather": "auto"},
    available=_available,
    supports=_supports,
    validate=_validate,
))
register(folded(TRITON))  # triton+shared: shared experts as always-on experts (MoMoE)
