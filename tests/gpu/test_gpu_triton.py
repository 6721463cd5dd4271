"""GPU tier: the `triton` backend compiled for the GPU (not the interpreter) against `naive` in higher precision,
at shapes the CPU tests cannot afford: F and D off multiples of 64 (F=1365, D=520: the zero-padding path), an
expert with no token, K=1, K=E, one hot expert over many row tiles; recompute 0 and 100; fp32 (ieee dots, vs
float64) and bf16 (vs float32); every tuning config of each kernel; `triton+shared` through the harness.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
Untuned here (MOEBENCH_TRITON_TUNE=0: each kernel's first config), except in test_every_config_...; the tuner
itself is test_gpu_tuning.py's.
"""
import pytest
import torch

from implementations.triton import moe, tuning
from moebench import harness
from moebench.spec import Case, ModelSpec, Workload
from tests.moecheck import TOL, check, make_inputs

pytestmark = pytest.mark.gpu

SHAPES = {  # name: (T, D, F, E, K, routing)
    "unaligned": (1000, 520, 1365, 8, 2, {}),
    "empty-expert": (512, 520, 1365, 8, 2, {"empty": 5}),
    "K1": (777, 520, 1365, 16, 1, {}),
    "K=E": (300, 520, 1365, 4, 4, {}),
    "hot": (2048, 512, 1024, 8, 2, {"hot": 3}),  # aligned (no padding); expert 3 takes every token: 16+ row tiles
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def compiled_untuned(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE", "0")
    monkeypatch.setattr(moe, "POISON", True)  # every buffer starts as NaN: an element no kernel writes fails


def test_the_kernels_are_compiled_for_the_gpu():
    """A GPU tier that ran the interpreter would prove nothing about the GPU kernels."""
    from triton.runtime.jit import JITFunction
    kn = moe.kernels(False)
    inputs = make_inputs(64, 64, 64, 4, 2, seed=0)
    assert max(check(moe.moe_forward, inputs, torch.bfloat16, "cuda").values()) <= TOL[torch.bfloat16]
    assert isinstance(kn.gate_up_kernel, JITFunction), type(kn.gate_up_kernel)
    assert type(kn.gate_up_kernel).__name__ != "InterpretedFunction"


@pytest.mark.parametrize("recompute", [0, 100])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_naive_on_the_gpu(shape, dtype, recompute):
    T, D, F, E, K, routing = SHAPES[shape]
    inputs = make_inputs(T, D, F, E, K, seed=list(SHAPES).index(shape), **routing)
    errs = check(moe.moe_forward, inputs, DTYPES[dtype], "cuda", recompute=recompute)
    assert max(errs.values()) <= TOL[DTYPES[dtype]], errs


# (recompute, the pregather option, PAD_TO) -> the kernel kinds (tuning.CONFIGS keys) that run on a Hopper GPU.
# PAD_TO=64 pads D=520, F=1365 to 576, 1408: the tensor-descriptor (TMA) kernels; PAD_TO=0: the masked pointer ones
# (the ones that run before Hopper).
VARIANTS = {
    (100, "on", 64): {"gate_up_tma", "down_tma", "dact_tma", "wgrad_sorted", "dx_tma"},
    (100, "off", 64): {"gate_up", "down_tma", "dact", "wgrad_sorted", "dx_tma"},
    (0, "auto", 64): {"gate_up", "down_tma", "bwd_act", "wgrad", "dx_tma"},
    (0, "auto", 0): {"gate_up", "down", "bwd_act", "wgrad", "dx"},
}  # together: every kind of tuning.CONFIGS but wgrad_tma, which the backward never launches under that name


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recompute,pregather,pad", list(VARIANTS),
                         ids=[f"rc{r}-pg{p}-pad{d}" for r, p, d in VARIANTS])
def test_every_config_computes_the_same_function(monkeypatch, recompute, pregather, pad):
    """The tuner may pick any config of a kernel, so each must be right: config i of every kernel kind (its last one
    where it has fewer), bf16, F and D off multiples of 64 (or padded), against the float32 reference."""
    monkeypatch.setattr(moe, "PAD_TO", pad)
    inputs = make_inputs(512, 520, 1365, 8, 2, seed=5, empty=2)
    used: set[str] = set()
    for i in range(max(map(len, tuning.CONFIGS.values()))):
        def pick(kind, key, launch, interpret, fp32=False, _i=i):
            used.add(kind)
            return tuning.CONFIGS[kind][min(_i, len(tuning.CONFIGS[kind]) - 1)]

        monkeypatch.setattr(tuning, "pick", pick)
        errs = check(moe.moe_forward, inputs, torch.bfloat16, "cuda", recompute=recompute, pregather=pregather)
        assert max(errs.values()) <= TOL[torch.bfloat16], (i, sorted(used), errs)
    if torch.cuda.get_device_capability()[0] >= 9:  # before Hopper no TMA kinds run
        assert used == VARIANTS[(recompute, pregather, pad)], sorted(used)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_shared_through_the_harness(dtype):
    """triton+shared: the shared experts folded in as always-on experts, checked by the harness against naive on
    those shapes (E + 2 experts, K + 2 slots per token), then timed with CUDA events."""
    spec = ModelSpec(name="fold-gpu", d_model=520, d_expert=1365, n_experts=8, top_k=2, n_heads=8,
                     n_shared_experts=2)
    wl = Workload(level="layer", mode="train", batch=2, seq=256, dtype=dtype, routing="zipf:1.2", warmup=1,
                  repeats=3)
    rec = harness.run_case(Case(model=spec, backend="triton+shared", workload=wl, device="cuda"), "gpu-tier", {})
    assert rec["status"] == "ok", rec["reason"]
    par = rec["metrics"]["parity"]
    assert par["ok"] and set(par["errors"]) == {"y", "dx", "dp", "dw1", "dw2"}
    assert max(par["errors"].values()) <= (1e-5 if dtype == "float32" else 2e-2), par
    samples = rec["metrics"]["step_ms"]["samples"]
    assert samples and all(0 < s < float("inf") for s in samples)
