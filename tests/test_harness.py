"""The harness: a wrong backend is a `mismatch` and never timed; an ok case carries every metric block;
the env block is complete; unavailable backends are `skipped` with their reason."""
import math

import pytest
import torch

from moebench import envinfo, harness, registry
from moebench.registry import Backend
from moebench.spec import Case, Workload, preset


@pytest.fixture(scope="module")
def env():
    return envinfo.collect("cpu")


def case(backend="grouped_mm", level="layer", **wl):
    model = preset("tiny" if level == "model" else "tiny-layer")
    w = dict(level=level, mode="train", batch=2, seq=16, dtype="float32", warmup=1, repeats=3) | wl
    return Case(model=model, backend=backend, workload=Workload(**w), max_time_s=0.3)


def test_ok_record_has_every_block(env):
    rec = harness.run_case(case(routing="zipf:1.2"), "t", env)
    assert rec["status"] == "ok", rec["reason"]
    m = rec["metrics"]
    n = len(m["step_ms"]["samples"])
    assert n >= 3 and all(s > 0 for s in m["step_ms"]["samples"])  # repeats is the fewest timed steps
    assert m["precision"]["n_steps"] == n and m["precision"]["target"] == 0.01
    assert m["tokens_per_s"]["p20"] <= m["tokens_per_s"]["p50"] <= m["tokens_per_s"]["p80"]
    assert m["parity"]["ok"] and max(m["parity"]["errors"].values()) <= 1e-5
    assert m["memory"]["peak_rss_gib"] > 0
    assert sum(map(sum, m["balance"]["counts_global"])) == min(n, 200) * 32 * 2  # kept steps * T * K
    for key in ("torch", "python", "host", "git_commit", "ceiling_tflops", "moebench"):
        assert key in rec["env"]


def test_model_level_records_loss_curve(env):
    rec = harness.run_case(case(level="model", routing="learned"), "t", env)
    assert rec["status"] == "ok", rec["reason"]
    curve = rec["metrics"]["loss_curve"]
    assert len(curve) == rec["metrics"]["precision"]["n_steps"] >= 3 and all(math.isfinite(v) for v in curve)
    assert rec["metrics"]["params"]["total"] == preset("tiny").params()["total"]


def test_wrong_backend_is_mismatch_and_never_timed(env):
    naive = registry.get("naive").forward
    registry.register(Backend(name="_wrong_scale", description="test",
                              forward=lambda x, i, p, w1, w2: naive(x, i, p, w1, w2) * 1.001))
    rec = harness.run_case(case("_wrong_scale"), "t", env)
    assert rec["status"] == "mismatch"
    assert "rel err" in rec["reason"]
    assert "step_ms" not in rec["metrics"] and "tokens_per_s" not in rec["metrics"]


def test_unavailable_backend_is_skipped_with_reason(env):
    registry.register(Backend(name="_absent", description="test", forward=registry.get("naive").forward,
                              available=lambda: "frobnicator not installed"))
    rec = harness.run_case(case("_absent"), "t", env)
    assert rec["status"] == "skipped" and rec["reason"] == "frobnicator not installed"


def test_cuda_case_on_cpu_machine_is_skipped(env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    c = case().model_copy(update={"device": "cuda"})
    rec = harness.run_case(c, "t", env)
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"]
