"""Shared experts folded into the expert block as always-on experts (MoMoE; registry.folded, MoE.fold_shared): the
same function and the same gradients as the unfolded layer, refused where it cannot hold, checked by the harness on
the shapes it times."""
from __future__ import annotations

import pytest
import torch

from moebench import core, harness, registry
from moebench.metrics import rel_err
from moebench.model import MoEModel, build_layer
from moebench.spec import Case, ModelSpec, Workload, preset


def _spec(n_shared=2, d_shared=None, **kw):
    return ModelSpec(name="fold", vocab_size=256, d_model=16, n_layers=2, n_heads=2, n_experts=5, top_k=2,
                     d_expert=12, n_shared_experts=n_shared, d_shared=d_shared, max_seq_len=64, **kw)


@pytest.mark.parametrize("layout", ["canonical", "linear"])
def test_folded_layer_is_the_same_function_with_the_same_gradients(layout):
    import dataclasses
    spec = _spec()
    base = dataclasses.replace(registry.get("naive"), weight_layout=layout)
    plain = build_layer(spec, base, seed=4).double()
    fold = build_layer(spec, registry.folded(base), seed=4).double()
    assert fold.shared is None and fold.n_folded == 2 and fold.w1_EDF2.shape == (7, 16, 24)
    assert (fold.w1_EDF2.transpose(1, 2).is_contiguous() if layout == "linear" else fold.w1_EDF2.is_contiguous())
    x = torch.randn(40, 16, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    dy = torch.randn(40, 16, dtype=torch.float64)
    (y0, r0), (y1, r1) = plain(xs[0]), fold(xs[1])
    assert torch.equal(r0.idx_TK, r1.idx_TK)  # the router sees the routed experts only
    y0.backward(dy)
    y1.backward(dy)
    assert rel_err(y1, y0) <= 1e-12 and rel_err(xs[1].grad, xs[0].grad) <= 1e-12
    assert rel_err(fold.w1_EDF2.grad[:5], plain.w1_EDF2.grad) <= 1e-12
    assert rel_err(fold.w2_EFD.grad[:5], plain.w2_EFD.grad) <= 1e-12
    g, u = plain.shared.w1_DF2.grad.chunk(2, dim=-1)  # shared hidden unit c*F + f is folded expert 5+c's unit f
    assert rel_err(fold.w1_EDF2.grad[5:, :, :12], g.reshape(16, 2, 12).transpose(0, 1)) <= 1e-12
    assert rel_err(fold.w1_EDF2.grad[5:, :, 12:], u.reshape(16, 2, 12).transpose(0, 1)) <= 1e-12
    assert rel_err(fold.w2_EFD.grad[5:], plain.shared.w2_FD.grad.reshape(2, 12, 16)) <= 1e-12
    assert rel_err(fold.router.wr_DE.grad, plain.router.wr_DE.grad) <= 1e-12  # the always-on weights are constant


def test_folded_model_has_the_unfolded_loss():
    spec = _spec(n_shared=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for b in (registry.get("naive"), registry.folded(registry.get("naive"))):
        m = MoEModel(spec, b, seed=3).double()
        losses.append(m(ids, ids)["loss"])
    assert abs(losses[0].item() - losses[1].item()) <= 1e-10 * abs(losses[0].item())


def test_fold_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match="drops tokens"):
        registry.folded(registry.get("capacity"))
    fb = registry.get("grouped_mm+shared")
    wl = Workload(level="layer", mode="train", batch=2, seq=16, dtype="float32", warmup=1, repeats=2)
    no_shared = Case(model=preset("tiny-layer"), backend="grouped_mm+shared", workload=wl)
    assert fb.why_not("cpu", "float32", core.shape_of(no_shared)) == "this model has no shared experts to fold"
    wide = Case(model=_spec(n_shared=1, d_shared=20), backend="grouped_mm+shared", workload=wl)
    assert "d_shared=20" in fb.why_not("cpu", "float32", core.shape_of(wide))
    assert fb.why_not("cpu", "float32") is None  # no case given (`moebench list`): no verdict
    rec = harness.run_case(no_shared, "t", {})
    assert rec["status"] == "skipped" and "no shared experts" in rec["reason"]


@pytest.mark.parametrize("level", ["layer", "model"])
def test_harness_runs_a_folded_variant_and_checks_it_on_the_folded_shapes(level):
    wl = Workload(level=level, mode="train", batch=2, seq=16, dtype="float32", warmup=1, repeats=2)
    rec = harness.run_case(Case(model=preset("tiny"), backend="grouped_mm+shared", workload=wl, max_time_s=0.3),
                           "t", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["parity"]["ok"]
