"""The `capacity` backend: Switch-style padded batched matmul that drops slots past C = ceil(cf*T*K/E).

It is checked against `naive` (the reference) on the slots it keeps, in float64, output and all gradients;
the harness parity does the same through Backend.capacity and catches a backend that keeps the wrong slots."""
import math

import pytest
import torch

from moebench import core, harness, registry
from moebench.registry import Backend, get
from moebench.routing import capacity, capacity_keep, synthetic_idx
from moebench.spec import Case, Workload, preset

T, D, F, E, K = 48, 12, 10, 6, 2


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"x_TD": torch.randn(T, D, generator=g, dtype=dtype),
            "p_TK": torch.rand(T, K, generator=g, dtype=dtype) + 0.05,
            "w1_EDF2": torch.randn(E, D, 2 * F, generator=g, dtype=dtype) / math.sqrt(D),
            "w2_EFD": torch.randn(E, F, D, generator=g, dtype=dtype) / math.sqrt(F)}


def run(fn, leaves, idx_TK, dy_TD, **opts):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    y = fn(leaves["x_TD"], idx_TK, leaves["p_TK"], leaves["w1_EDF2"], leaves["w2_EFD"], **opts)
    y.backward(dy_TD)
    return [y.detach()] + [leaves[k].grad for k in ("x_TD", "p_TK", "w1_EDF2", "w2_EFD")]


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_matches_naive_on_kept_slots(cf):
    idx_TK = synthetic_idx("zipf:1.5", T, E, K, seed=3)     # skewed: hot experts overflow
    leaves = inputs()
    dy = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    keep_TK = capacity_keep(idx_TK, E, capacity(T, K, E, cf))
    assert 0 < (~keep_TK).sum() < keep_TK.numel()           # some slots dropped, some kept
    got = run(get("capacity").forward, leaves, idx_TK, dy, capacity_factor=cf)

    def naive_kept(x, idx, p, w1, w2):
        return get("naive").forward(x, idx, p * keep_TK, w1, w2)

    want = run(naive_kept, leaves, idx_TK, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (got[2][~keep_TK] == 0).all()                     # a dropped slot's gate weight gets no gradient


def test_is_dropless_when_capacity_suffices():
    idx_TK = synthetic_idx("hot:1", T, E, K, seed=1)
    counts = torch.bincount(idx_TK.reshape(-1), minlength=E)
    cf = counts.max().item() * E / (T * K)                    # C = the largest load: nothing dropped
    leaves, dy = inputs(1), torch.randn(T, D, dtype=torch.float64)
    got = run(get("capacity").forward, leaves, idx_TK, dy, capacity_factor=cf)
    want = run(get("naive").forward, leaves, idx_TK, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    less = get("capacity").forward(leaves["x_TD"], idx_TK, leaves["p_TK"], leaves["w1_EDF2"], leaves["w2_EFD"],
                                   capacity_factor=cf * 0.9)
    assert not torch.allclose(less, want[0])                   # and one slot less does drop something


def test_bf16_close_to_fp64_reference():
    idx_TK = synthetic_idx("zipf:1.2", T, E, K, seed=2)
    leaves = inputs(2)
    keep_TK = capacity_keep(idx_TK, E, capacity(T, K, E, 1.0))
    ref = get("naive").forward(leaves["x_TD"], idx_TK, leaves["p_TK"] * keep_TK, leaves["w1_EDF2"], leaves["w2_EFD"])
    b = {k: v.bfloat16() for k, v in leaves.items()}
    got = get("capacity").forward(b["x_TD"], idx_TK, b["p_TK"], b["w1_EDF2"], b["w2_EFD"], capacity_factor=1.0)
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).norm() / ref.norm() < 2e-2


def layer_case(backend="capacity", routing="zipf:1.5", **opts):
    return Case(model=preset("tiny-layer"), backend=backend, backend_options=opts,
                workload=Workload(level="layer", batch=2, seq=32, routing=routing, warmup=1, repeats=2), max_time_s=0.3)


def test_harness_parity_compares_kept_slots_and_records_dropped_fraction():
    case = layer_case(capacity_factor=1.0)
    par = core.parity(case)
    assert par["ok"] and "kept slots" in par["reference"]
    assert par["capacity"] == capacity(64, 2, 6, 1.0) and par["dropped_frac"] > 0
    rec = harness.run_case(case, "t", {})
    assert rec["status"] == "ok", rec["reason"]
    m = rec["metrics"]
    assert 0 < m["dropped_frac"] < 1
    # the dropped fraction is the loads' overflow: sum_i max(0, c_i - C) / slots, per step and layer
    C = capacity(64, 2, 6, 1.0)
    counts = m["balance"]["counts_global"][0]
    n = min(m["precision"]["n_steps"], 200)  # the steps whose loads the record keeps (same fixed routing each)
    assert m["dropped_frac"] == pytest.approx(sum(max(0, c / n - C) for c in counts) / (64 * 2), abs=1e-12)


def _keeps_the_last_comers(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, capacity_factor=1.25):
    """A wrong capacity backend: keeps the LAST C slots of each expert instead of the first."""
    flip = torch.flip(idx_TK, dims=[0, 1])
    keep = torch.flip(capacity_keep(flip, w1_EDF2.shape[0], capacity(*idx_TK.shape, w1_EDF2.shape[0],
                                                                        capacity_factor)), dims=[0, 1])
    return get("naive").forward(x_TD, idx_TK, p_TK * keep, w1_EDF2, w2_EFD)


def test_parity_catches_a_backend_that_keeps_the_wrong_slots(monkeypatch):
    registry.all_backends()
    monkeypatch.setitem(registry._REGISTRY, "test-capacity-wrong", Backend(
        name="test-capacity-wrong", forward=_keeps_the_last_comers, description="test only", dropless=False,
        options={"capacity_factor": 1.25},
        capacity=lambda T, K, E, capacity_factor=1.25: capacity(T, K, E, capacity_factor)))
    par = core.parity(layer_case("test-capacity-wrong", capacity_factor=1.0))
    assert not par["ok"]


def test_capacity_backend_runs_in_a_model_step():
    case = Case(model=preset("tiny"), backend="capacity", backend_options={"capacity_factor": 1.0}, max_time_s=0.3,
                workload=Workload(level="model", batch=2, seq=16, routing="hot:1", warmup=1, repeats=2))
    rec = harness.run_case(case, "t", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["dropped_frac"] > 0.1              # one hot expert overflows
