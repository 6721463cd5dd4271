"""GPU tier: what `harness.run_case` measures on CUDA. Timed steps between CUDA events scale with the work (a
layer case with twice the tokens takes about twice as long); layer-level timing writes over the L2 cache before
every timed step; a case over its `memory_budget_gib` ends `oom` and one within it runs with its peak under it.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
import math
import os
import statistics

import pytest
import torch

from moebench import envinfo, harness
from moebench.spec import Case, ModelSpec, Workload

pytestmark = pytest.mark.gpu

# GPU-bound at the timed sizes: a bf16 training step of 18*K*D*F = 75 MFLOP per token, 1.2 TFLOP at 16k tokens (ms
# of GPU work, no host sync in grouped_mm), so twice the tokens is about twice the time
SPEC = ModelSpec(name="gpu-tier-layer", d_model=2048, d_expert=1024, n_experts=8, top_k=2, n_heads=16)


def layer_case(T: int, *, budget_gib: float | None = None, repeats: int = 20, spec: ModelSpec = SPEC) -> Case:
    wl = Workload(level="layer", mode="train", batch=1, seq=T, dtype="bfloat16", routing="uniform", warmup=3,
                  repeats=repeats)
    return Case(model=spec, backend="grouped_mm", workload=wl, device="cuda", memory_budget_gib=budget_gib)


@pytest.fixture(scope="module")
def env():
    """The env block; the matmul ceiling (two 8192^2 random matrices) measured here, not inside a test's profile."""
    envinfo.ceiling(torch.device("cuda"))
    return envinfo.collect("cuda")


@pytest.fixture
def whole_gpu():
    """A case's memory budget caps this process's allocator (blocks it already holds would still be reused, so
    none are held at the start): the rest of the tests get the whole GPU back."""
    torch.cuda.empty_cache()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def samples_of(rec: dict) -> list[float]:
    assert rec["status"] == "ok", rec["reason"]
    ms = rec["metrics"]["step_ms"]["samples"]
    assert len(ms) >= 3 and all(math.isfinite(s) and s > 0 for s in ms), ms
    return ms


def test_cuda_event_times_scale_with_the_work(env):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip("timing ratios need the GPU to themselves: scripts/gpu_tests.sh checks them in its serial pass")
    ms = {T: statistics.median(samples_of(harness.run_case(layer_case(T), "gpu-tier", env))) for T in (16384, 32768)}
    ratio = ms[32768] / ms[16384]
    assert 1.6 <= ratio <= 2.4, ms  # twice the tokens: twice the FLOPs and bytes, in a GPU-bound step


def test_layer_timing_flushes_l2_before_each_timed_step(env):
    """Under torch.profiler (shapes recorded): between the timed steps the harness writes a buffer of at least the
    L2 cache's size, once per timed step at least. The case is small, so no tensor of its own comes near that."""
    from torch.profiler import ProfilerActivity, profile
    small = ModelSpec(name="gpu-tier-small", d_model=512, d_expert=512, n_experts=8, top_k=2, n_heads=4)
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        rec = harness.run_case(layer_case(1024, repeats=8, spec=small), "gpu-tier", env)
    n_timed = len(samples_of(rec))
    writes = ("aten::fill_", "aten::zero_", "aten::copy_", "aten::uniform_", "aten::normal_", "aten::random_")
    min_numel = l2_bytes // 4  # a tensor of 4-byte elements as big as the L2 (the profiler records no dtype)
    big = [e for e in prof.events() if e.name in writes and any(math.prod(s) >= min_numel for s in e.input_shapes if s)]
    assert len(big) >= n_timed, (len(big), n_timed, l2_bytes)


def test_a_case_over_its_memory_budget_is_oom(env, whole_gpu):
    """0.1 GiB is far below what a 32k-token layer needs (its float32 parity tensors alone take over 1 GiB)."""
    rec = harness.run_case(layer_case(32768, budget_gib=0.1, repeats=3), "gpu-tier", env)
    assert rec["status"] == "oom", (rec["status"], rec["reason"])
    reason = rec["reason"]
    # the reason names the cap: torch's allocator message says "<cap> allowed" under a memory fraction
    assert "out of memory" in reason.lower() and ("102.40 MiB allowed" in reason or "memory_budget_gib" in reason), reason
    assert "step_ms" not in rec["metrics"]


def test_a_case_within_its_memory_budget_runs_under_it(env, whole_gpu):
    budget = 8.0
    rec = harness.run_case(layer_case(4096, budget_gib=budget, repeats=3), "gpu-tier", env)
    samples_of(rec)
    peak = rec["metrics"]["memory"]["peak_allocated_gib"]
    assert 0 < peak <= budget, peak
