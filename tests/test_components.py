"""Attention and norm variants (moebench.components), moebench's Triton RMSNorm and the liger-kernel peers.

Legend: B batch, H heads, S seq, Dh head dim, N rows, D model dim, T tokens, F expert hidden, E experts,
K top-k.
The Triton RMSNorm runs on the GPU when CUDA is there, else under TRITON_INTERPRET=1 on CPU (conftest's
triton_device; its kernels are jitted per mode, so it does not matter whether triton was imported before). The liger peers need CUDA: here their availability reasons are
checked, and their glue (layouts, dtypes, the grouped GEMM path) is checked with a plain-torch op standing in
for liger's, following liger's documented contract.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from implementations.naive import forward as naive_forward
from implementations.peers import liger
from implementations.triton_rmsnorm import TritonRMSNorm
from moebench import components, harness, registry
from moebench.metrics import rel_err
from moebench.model import in_layout
from moebench.spec import Case, Workload, preset

FP32_TOL, BF16_TOL = 1e-5, 2e-2


def _qkv(B, H, S, Dh, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, Dh, generator=g) for _ in range(3)]


# --------------------------------------------------------------------------------------------- attention
def test_math_attention_is_causal_softmax_attention():
    q, k, v = _qkv(2, 3, 7, 8, seed=1)
    out = components.attention_fn("math")(q.double(), k.double(), v.double())
    # row by row, by hand: token s attends to tokens 0..s
    for s in range(7):
        qs, ks = q[:, :, s:s + 1].double(), k[:, :, :s + 1].double()
        w = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(8), -1)
        assert torch.allclose(out[:, :, s:s + 1], w @ v[:, :, :s + 1].double(), atol=1e-12)


@pytest.mark.parametrize("name", components.ATTENTIONS)
def test_attention_variants_match_math_where_available(name):
    reason = components.why_not(name, "torch", "cpu", "float32")
    if name in ("math", "sdpa", "sdpa-flash"):  # PyTorch's CPU build has these kernels
        assert reason is None, reason
    if reason is not None:
        assert name in reason or "not installed" in reason
        pytest.skip(reason)
    q, k, v = _qkv(2, 4, 33, 16, seed=2)  # S not a multiple of any block
    ref = components.attention_fn("math")(q.double(), k.double(), v.double())
    for dt, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):
        got = components.attention_fn(name)(q.to(dt), k.to(dt), v.to(dt))
        assert rel_err(got, ref) <= tol, (name, dt)


def test_cuda_only_attention_is_skipped_on_cpu_with_a_reason():
    for name in ("sdpa-cudnn", "sdpa-efficient"):
        reason = components.why_not(name, "torch", "cpu", "float32")
        assert reason is not None and name in reason and "cpu" in reason
    reason = components.why_not("flash-attn", "torch", "cpu", "bfloat16")
    assert reason in ("flash-attn not installed", "attention 'flash-attn' needs CUDA")


def test_why_not_names_bad_input():
    assert "unknown attention 'flash'" in components.why_not("flash", "torch", "cpu", "float32")
    assert "unknown norm 'apex'" in components.why_not("math", "apex", "cpu", "float32")
    if not torch.cuda.is_available():
        assert "CUDA" in components.why_not("math", "torch", "cuda", "bfloat16")
    with pytest.raises(ValueError, match="valid: math"):
        components.attention_fn("nope")
    with pytest.raises(ValueError, match="valid: torch, liger, triton"):
        components.norm("nope", 8, 1e-5)


# ------------------------------------------------------------------------------------------------- norms
def test_liger_norm_is_skipped_on_cpu_never_replaced():
    reason = components.why_not("math", "liger", "cpu", "float32")
    assert reason in ("liger-kernel not installed", "norm 'liger' needs CUDA (liger-kernel's Triton kernels)")


def test_triton_norm_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in components.why_not("math", "triton", "cpu", "float32")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        TritonRMSNorm(8)(torch.randn(2, 8))


def _norm_pair(D, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(D, generator=g) + 0.5  # not ones: the weight must be applied and its gradient right
    tri, ref = TritonRMSNorm(D, 1e-5).to(device, dtype), components.RMSNorm(D, 1e-5).to(device, torch.float64)
    with torch.no_grad():
        tri.weight.copy_(w)
        ref.weight.copy_(w)
    return tri, ref, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 7, 33), (1, 64), (9, 128), (3, 5), (6, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_rmsnorm_matches_torch_forward_and_backward(triton_device, shape, dtype):
    D = shape[-1]
    tri, ref, g = _norm_pair(D, dtype, seed=sum(shape), device=triton_device)
    x, dy = (t.to(triton_device) for t in (torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)))
    xa, xb = x.to(dtype).detach().requires_grad_(), x.double().detach().requires_grad_()
    ya, yb = tri(xa), ref(xb)
    assert ya.dtype == dtype and ya.shape == x.shape and ya.device.type == triton_device
    ya.backward(dy.to(dtype))
    yb.backward(dy.double())
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for name, a, b in (("y", ya, yb), ("dx", xa.grad, xb.grad), ("dw", tri.weight.grad, ref.weight.grad)):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def test_triton_rmsnorm_takes_strided_and_empty_input(triton_device):
    tri, ref, g = _norm_pair(24, torch.float32, seed=3, device=triton_device)
    x = torch.randn(24, 10, generator=g).to(triton_device).t()  # (10, 24), not contiguous
    assert rel_err(tri(x), ref(x.double())) <= FP32_TOL
    e = torch.randn(0, 24, device=triton_device, requires_grad=True)
    tri(e).sum().backward()
    assert e.grad.shape == (0, 24) and tri.weight.grad is not None and not tri.weight.grad.any()


def test_model_with_triton_norm_matches_torch_norm(triton_device):
    """The whole tiny model, forward and backward, with each norm: the same function of the same weights."""
    from moebench.model import MoEModel
    grads = {}
    for name in ("torch", "triton"):
        spec = preset("tiny", norm=name)
        assert components.why_not(spec.attention, name, triton_device, "float32") is None
        model = MoEModel(spec, registry.get("naive"), seed=0).to(triton_device)
        ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(triton_device)
        out = model(ids, ids)
        out["loss"].backward()
        grads[name] = {"logits": out["logits"].detach()} | {n: p.grad for n, p in model.named_parameters()}
    assert grads["torch"].keys() == grads["triton"].keys()
    for k, ref in grads["torch"].items():
        assert rel_err(grads["triton"][k], ref) <= 1e-4, k


def test_harness_runs_a_model_case_with_component_variants(triton_device):
    # flash attention: fp32 on PyTorch's CPU build, 16-bit only on CUDA
    dtype = "float32" if triton_device == "cpu" else "bfloat16"
    wl = Workload(level="model", mode="train", batch=2, seq=16, dtype=dtype, warmup=1, repeats=2)
    ok = Case(model=preset("tiny", attention="sdpa-flash", norm="triton"), backend="shuffle", workload=wl,
              device=triton_device, max_time_s=0.3)
    rec = harness.run_case(ok, "test", {})
    assert rec["status"] == "ok", rec["reason"]
    liger = Case(model=preset("tiny", norm="liger"), backend="shuffle", workload=wl, device=triton_device,
                 max_time_s=0.3)
    rec = harness.run_case(liger, "test", {})
    if components.why_not("math", "liger", triton_device, dtype) is None:  # liger-kernel installed, on CUDA
        assert rec["status"] == "ok", rec["reason"]
    else:
        assert rec["status"] == "skipped" and "liger" in rec["reason"]


# ------------------------------------------------------------------------------------------ liger peers
def test_liger_backends_are_registered_with_their_limits():
    sw, fm = registry.get("liger_swiglu"), registry.get("liger_fused_moe")
    assert sw.devices == ("cuda",) and fm.devices == ("cuda",)
    assert fm.dtypes == ("bfloat16",)
    if not torch.cuda.is_available():
        for b in (sw, fm):
            reason = b.why_not("cpu", "bfloat16")
            assert "liger-kernel not installed" in reason or "needs CUDA" in reason


def test_liger_availability_reasons(monkeypatch):
    real = liger.importlib.util.find_spec
    monkeypatch.setattr(liger.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("liger_kernel") else real(name, *a))
    assert liger._available_fused_moe().startswith("liger-kernel not installed")
    assert liger._available_swiglu().startswith("liger-kernel not installed")
    monkeypatch.setattr(liger, "_installed", lambda: None)
    monkeypatch.setattr(liger, "_has_fused_moe", lambda: False)
    assert "has no liger_kernel.ops.fused_moe" in liger._available_fused_moe()
    assert liger._supports_swiglu("cpu", "float32", {"D": 12, "F": 16}).startswith("liger_swiglu needs D")


def _moe_inputs(T, D, Fh, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
    leaves = {"x": torch.randn(T, D, generator=g), "p": torch.rand(T, K, generator=g) + 0.1,
              "w1": torch.randn(E, D, 2 * Fh, generator=g) / math.sqrt(D),
              "w2": torch.randn(E, Fh, D, generator=g) / math.sqrt(Fh)}
    return leaves, idx, torch.randn(T, D, generator=g)


def _run(fn, leaves, idx, dy, dtype):
    t = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    y = fn(t["x"], idx, t["p"], t["w1"], t["w2"])
    y.backward(dy.to(dtype))
    return {"y": y.detach()} | {f"d{k}": v.grad for k, v in t.items()}


def _liger_fused_moe_contract(x_TH, gate_up_EI2H, down_EHI, idx_TK, w_TK):
    """liger_kernel.ops.fused_moe.LigerFusedMoEFunction as documented: gate_up (E, 2I, H) with gate rows
    [0, I) and up rows [I, 2I), down (E, H, I), int32 indices; out[t] = sum_k w[t,k] * down[e] silu(g) * u."""
    assert idx_TK.dtype == torch.int32
    E, I2, H = gate_up_EI2H.shape
    Fh = I2 // 2
    assert x_TH.shape[1] == H and down_EHI.shape == (E, H, Fh)
    e_TK = idx_TK.long()
    gu_TKI2 = torch.einsum("th,tkih->tki", x_TH, gate_up_EI2H[e_TK])
    a_TKI = F.silu(gu_TKI2[..., :Fh]) * gu_TKI2[..., Fh:]
    y_TKH = torch.einsum("tki,tkhi->tkh", a_TKI, down_EHI[e_TK])
    return (y_TKH * w_TK.unsqueeze(-1)).sum(1)


def test_liger_fused_moe_glue_matches_naive(monkeypatch):
    seen = []

    def contract(x, gate_up, down, idx, w):
        seen.append(gate_up.is_contiguous() and down.is_contiguous())  # liger's .contiguous() would copy nothing
        return _liger_fused_moe_contract(x, gate_up, down, idx, w)

    monkeypatch.setattr(liger, "_fused_moe", lambda: contract)
    assert registry.get("liger_fused_moe").weight_layout == "linear"
    leaves, idx, dy = _moe_inputs(T=13, D=8, Fh=6, E=4, K=2, seed=4)
    ref = _run(naive_forward, leaves, idx, dy, torch.float64)
    got = _run(liger.fused_moe_forward, leaves, idx, dy, torch.float64)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-12, k
    lin = dict(leaves)
    lin["w1"], lin["w2"] = in_layout(leaves["w1"], leaves["w2"], "linear")  # as the MoE layer stores them for liger
    got = _run(liger.fused_moe_forward, lin, idx, dy, torch.float64)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-12, k
    assert seen == [False, True]


def test_liger_swiglu_glue_matches_naive(monkeypatch):
    # LigerSiLUMulFunction's math
    monkeypatch.setattr(liger, "_silu_mul", lambda: (lambda a, b: F.silu(a) * b))
    leaves, idx, dy = _moe_inputs(T=21, D=16, Fh=8, E=5, K=2, seed=5)
    ref = _run(naive_forward, leaves, idx, dy, torch.float64)
    got = _run(liger.swiglu_forward, leaves, idx, dy, torch.float32)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= FP32_TOL, k
