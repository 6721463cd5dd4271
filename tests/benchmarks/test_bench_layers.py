"""CPU microbenchmarks of each registered backend's MoE layer (pytest-benchmark), forward and train (fwd+bwd).

    pytest tests/benchmarks --benchmark-only --benchmark-autosave          # measure, save as the baseline
    pytest tests/benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%
                                                          # measure again: fails on a median 25% slower than it
    pytest -q                                             # also runs them, one untimed-for-comparison round each

A plain test run checks that every backend's layer runs at this shape (finite output; in train mode a finite
input gradient) and compares no times: a slow-down is caught only against a saved baseline, as above, on the
same machine. The shape is small so the normal test run stays fast. Real numbers come from `moebench run` on a GPU.
A backend that cannot run here is skipped with its own reason.
"""
from __future__ import annotations

import os

import pytest
import torch

from moebench import registry
from moebench.model import build_layer
from moebench.spec import ModelSpec

SPEC = ModelSpec(name="bench-layer", d_model=128, d_expert=256, n_experts=8, top_k=2, n_heads=1)
T = 256
ROUNDS = {"measure": 30, "pass-through": 1}  # --benchmark-only measures; a plain `pytest` run only exercises
BACKENDS = sorted(registry.all_backends())


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))  # comparable across machines with more cores (CI has 2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", BACKENDS)
def test_layer(benchmark, request, name, mode):
    backend = registry.get(name)
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in name:
        pytest.skip("TRITON_INTERPRET=1: timing the Triton interpreter would measure nothing of interest")
    if backend.needs_process_group:
        pytest.skip(f"{name} needs a process group: measured by `moebench run --nproc N`")
    why = backend.why_not("cpu", "float32", {"T": T, "D": SPEC.d_model, "F": SPEC.d_expert, "E": SPEC.n_experts,
                                             "K": SPEC.top_k, "n_shared": SPEC.n_shared_experts})
    if why:
        pytest.skip(why)
    layer = build_layer(SPEC, backend, dict(backend.options), seed=0)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, SPEC.d_model, generator=g, requires_grad=mode == "train")
    dy_TD = torch.randn(T, SPEC.d_model, generator=g)

    def step():
        if mode == "train":
            layer.zero_grad(set_to_none=True)
            x_TD.grad = None
            y_TD, _ = layer(x_TD)
            y_TD.backward(dy_TD)
            return y_TD
        with torch.no_grad():
            return layer(x_TD)[0]

    y_TD = step()
    assert y_TD.shape == (T, SPEC.d_model) and torch.isfinite(y_TD).all()
    if mode == "train":
        assert x_TD.grad is not None and torch.isfinite(x_TD.grad).all()
    benchmark.group = f"moe-layer-{mode} T={T} D={SPEC.d_model} F={SPEC.d_expert} E={SPEC.n_experts} K={SPEC.top_k}"
    benchmark.extra_info["tokens"] = T
    measure = request.config.getoption("benchmark_only")
    benchmark.pedantic(step, rounds=ROUNDS["measure" if measure else "pass-through"], warmup_rounds=int(measure),
                       iterations=1)  # (the step above warmed the layer up already)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s_median"] = T / benchmark.stats.stats.median
