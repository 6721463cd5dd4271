"""GPU tier: FP8 expert GEMMs (gemm_dtype fp8-rowwise). Written on CPU, not yet run on a GPU.

- moebench/quant.py quantises a bf16 tensor on CUDA to the same bits as on CPU (the parity reference's claim);
- torch._scaled_grouped_mm (2D x 3D, rowwise scales) equals its documented contract, emulated in fp32, on uneven
  groups: empty, and sizes that are not multiples of 16 (grouped_mm does not pad token groups);
- grouped_mm fp8-rowwise through the harness (eager and CUDA graphs): parity against the fp8 reference passes, the
  gate could tell an unquantised backend apart, and the record carries the end-to-end error vs naive;
- an fp8 train-run (autocast, fp32 master weights) trains with finite losses;
- torchao_fp8 through the harness where torchao is installed (skipped with the backend's reason where not).

Legend: S slots, K reduced dim, N output columns, E experts, T tokens, D model dim, F expert hidden.
"""
import math

import pytest
import torch

from moebench import harness, metrics, quant, registry
from moebench.spec import Case, ModelSpec, Workload, preset

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(name="gpu-tier-fp8", d_model=1024, d_expert=512, n_experts=16, top_k=4, n_heads=8)
T = 2048


def test_quantise_on_cuda_matches_cpu_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 1024, generator=g) * torch.logspace(-4, 4, 256).unsqueeze(-1)).bfloat16()
    for dim in (-1, -2):
        qc, sc = quant.quantize(x, dim)
        qg, sg = quant.quantize(x.cuda(), dim)
        assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sg.cpu(), sc)


def test_scaled_grouped_mm_is_its_contract_on_uneven_groups():
    if registry.get("grouped_mm").why_not("cuda", "bfloat16", {"gemm_dtype": "fp8-rowwise"}):
        pytest.skip(registry.get("grouped_mm").why_not("cuda", "bfloat16", {"gemm_dtype": "fp8-rowwise"}))
    g = torch.Generator(device="cuda").manual_seed(1)
    sizes = [0, 5, 37, 100, 16, 1]
    S, K, N, E = sum(sizes), 256, 384, len(sizes)
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    a = torch.randn(S, K, device="cuda", generator=g).bfloat16()
    b = (torch.randn(E, K, N, device="cuda", generator=g) / 16).bfloat16()
    qa, sa = quant.quantize(a, -1)
    qb, sb = quant.quantize(b, -2)
    out = torch._scaled_grouped_mm(qa, qb.transpose(-2, -1).contiguous().transpose(-2, -1), sa.reshape(-1),
                                   sb.squeeze(-2).contiguous(), offs=offs, out_dtype=torch.bfloat16,
                                   use_fast_accum=True)
    want = torch._grouped_mm(quant.dequantize(qa, sa), quant.dequantize(qb, sb), offs=offs)
    assert metrics.rel_err(out.float(), want) < 1e-2


@pytest.mark.parametrize("exec_", ["eager", "graphs"])
def test_grouped_mm_fp8_passes_the_gate_through_the_harness(exec_):
    wl = Workload(level="layer", mode="train", batch=1, seq=T, dtype="bfloat16", routing="zipf:1.2", warmup=1,
                  repeats=3, gemm_dtype="fp8-rowwise", exec=exec_)
    rec = harness.run_case(Case(model=SPEC, backend="grouped_mm", workload=wl, device="cuda"), "gpu-tier", {})
    assert rec["status"] == "ok", rec["reason"]
    par = rec["metrics"]["parity"]
    assert par["ok"] and par["detects_unquantised"], par
    assert 0.02 < par["vs_naive"]["y"] < 0.15 and all(par["errors"][k] <= par["tols"][k] for k in par["errors"])
    assert "fp8" in rec["metrics"]["backend_path"]


def test_fp8_train_run_trains():
    wl = Workload(level="train-run", batch=4, seq=64, dtype="bfloat16", gemm_dtype="fp8-rowwise",
                  train={"steps": 20, "lr": 3e-3, "eval_every": 10, "eval_batches": 2})
    rec = harness.run_case(Case(model=preset("tiny"), backend="grouped_mm", workload=wl, device="cuda"), "gpu-tier", {})
    assert rec["status"] == "ok", rec["reason"]
    curve = rec["metrics"]["loss_curve"]
    assert len(curve) == 20 and all(math.isfinite(v) for v in curve) and curve[-1] < curve[0]


def test_torchao_fp8_through_the_harness():
    backend = registry.get("torchao_fp8")
    shape = {"T": T, "D": SPEC.d_model, "F": SPEC.d_expert, "gemm_dtype": "fp8-rowwise-fp8bwd"}
    why = backend.why_not("cuda", "bfloat16", shape)
    if why:
        pytest.skip(f"torchao_fp8: {why}")
    wl = Workload(level="layer", mode="train", batch=1, seq=T, dtype="bfloat16", routing="zipf:1.2", warmup=1,
                  repeats=3, gemm_dtype="fp8-rowwise-fp8bwd")
    rec = harness.run_case(Case(model=SPEC, backend="torchao_fp8", workload=wl, device="cuda"), "gpu-tier", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["parity"]["ok"] and rec["metrics"]["weight_layout"] == "linear"
