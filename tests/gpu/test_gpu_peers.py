"""GPU tier: the peer backends (liger-kernel's liger_swiglu and liger_fused_moe, SonicMoE on both of its routing
paths) against `naive` through the harness, where they are installed; skipped with the backend's own reason where
not. Each is checked on the weight layout it is timed on (registry.Backend.weight_layout).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
import pytest

from moebench import harness, registry
from moebench.spec import Case, ModelSpec, Workload

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(name="gpu-tier-peers", d_model=1024, d_expert=512, n_experts=16, top_k=4, n_heads=8)
T = 2048
PEERS = [("liger_swiglu", {}), ("liger_fused_moe", {}), ("sonicmoe", {"routing_path": "general"}),
         ("sonicmoe", {"routing_path": "top_k"})]


@pytest.mark.parametrize("name,options", PEERS, ids=[n + "".join(f"-{v}" for v in o.values()) for n, o in PEERS])
def test_peer_matches_naive_through_the_harness(name, options):
    backend = registry.get(name)
    shape = {"T": T, "D": SPEC.d_model, "F": SPEC.d_expert, "E": SPEC.n_experts, "K": SPEC.top_k, "n_shared": 0,
             "d_shared": SPEC.d_expert}
    why = backend.why_not("cuda", "bfloat16", shape)
    if why:
        pytest.skip(f"{name}: {why}")
    wl = Workload(level="layer", mode="train", batch=1, seq=T, dtype="bfloat16", routing="zipf:1.2", warmup=1,
                  repeats=3)
    rec = harness.run_case(Case(model=SPEC, backend=name, backend_options=options, workload=wl, device="cuda"),
                           "gpu-tier", {})
    assert rec["status"] == "ok", rec["reason"]
    par = rec["metrics"]["parity"]
    assert set(par["errors"]) == {"y", "dx", "dp", "dw1", "dw2"} and max(par["errors"].values()) <= 2e-2, par
    assert rec["metrics"]["weight_layout"] == backend.weight_layout
