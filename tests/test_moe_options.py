"""Real MoE blocks' options (issue 17), each off by default: Qwen2-MoE's shared-expert gate, DeepSeek-V3's
e_score_correction_bias as a fixed score_bias, Mixtral's router_jitter_noise. References in float64 on fresh
random inputs. Legend: T tokens, D model dim, E experts, K top-k, F expert hidden."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from moebench import registry
from moebench.metrics import rel_err
from moebench.model import build_layer
from moebench.routing import Router
from moebench.spec import Case, ModelSpec, RouterSpec, Workload, preset


def _spec(**kw):
    base = {"name": "opt", "d_model": 16, "n_experts": 6, "top_k": 2, "d_expert": 12, "n_heads": 1}
    return ModelSpec(**(base | kw))


# ------------------------------------------------------------------------------------------- shared gate
def test_shared_gate_scales_the_shared_output_per_token_and_learns():
    spec = _spec(n_shared_experts=1, d_shared=20, shared_gate=True)
    layer = build_layer(spec, registry.get("naive"), seed=2).double()
    x_TD = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    y_TD, r = layer(x_TD)
    w1, w2, sh = layer.w1_EDF2, layer.w2_EFD, layer.shared
    ref_TD = torch.zeros_like(x_TD)
    for t in range(30):  # the naive formula, token by token
        for k in range(2):
            e = r.idx_TK[t, k]
            g, u = (x_TD[t] @ w1[e]).chunk(2)
            ref_TD[t] += r.p_TK[t, k] * ((F.silu(g) * u) @ w2[e])
        g, u = (x_TD[t] @ sh.w1_DF2).chunk(2)
        ref_TD[t] += torch.sigmoid(x_TD[t] @ layer.shared_gate_D1[:, 0]) * ((F.silu(g) * u) @ sh.w2_FD)
    assert rel_err(y_TD, ref_TD) <= 1e-12
    y_TD.sum().backward()
    assert layer.shared_gate_D1.grad is not None and layer.shared_gate_D1.grad.abs().sum() > 0
    ungated = build_layer(_spec(n_shared_experts=1, d_shared=20), registry.get("naive"), seed=2).double()
    assert ungated.shared_gate_D1 is None
    assert rel_err(ungated(x_TD)[0], y_TD) > 1e-3  # the gate changes the function (sigmoid is never 1)


def test_shared_gate_off_leaves_weights_unchanged_and_needs_shared_experts():
    """Off by default: no parameter, so the seeded init draws the same weights as before the option
    existed."""
    a = build_layer(_spec(n_shared_experts=1), registry.get("naive"), seed=5)
    b = build_layer(_spec(n_shared_experts=1, shared_gate=False), registry.get("naive"), seed=5)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValidationError, match="shared_gate .* needs n_shared_experts"):
        _spec(shared_gate=True)


def test_gated_shared_experts_are_not_folded():
    spec = _spec(n_shared_experts=1, shared_gate=True)  # d_shared = d_expert: foldable, but for the gate
    with pytest.raises(ValueError, match="gated per token"):
        build_layer(spec, registry.get("grouped_mm+shared"))
    fb = registry.get("grouped_mm+shared")
    shape = {"T": 8, "D": 16, "F": 12, "E": 6, "K": 2, "n_shared": 1, "d_shared": 12}
    why = fb.why_not("cpu", "float32", shape | {"shared_gate": True})
    assert why is not None and "shared_gate" in why
    assert fb.why_not("cpu", "float32", shape) is None


# -------------------------------------------------------------------------------------------- score bias
def test_score_bias_selects_on_s_plus_b_and_weights_from_s():
    E, K, D = 8, 2, 16
    b_E = torch.randn(E, generator=torch.Generator().manual_seed(1)).mul(0.3)
    for scoring in ("sigmoid", "softmax"):
        spec = RouterSpec(scoring=scoring, score_bias=tuple(b_E.tolist()), route_scale=2.5)
        r = Router(spec, D, E, K)
        torch.nn.init.normal_(r.wr_DE)
        x_TD = torch.randn(64, D)
        out = r(x_TD)
        logits = (x_TD @ r.wr_DE).double()
        s = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        idx = (s + b_E.double()).topk(K, dim=-1).indices
        p = s.gather(1, idx)
        assert torch.equal(out.idx_TK, idx)
        assert rel_err(out.p_TK.double(), 2.5 * p / p.sum(-1, keepdim=True)) <= 1e-6
        assert not torch.equal(idx, s.topk(K, dim=-1).indices)  # the bias moved some choices


def test_score_bias_is_fixed_unless_bias_balancing_updates_it():
    b = (0.1, -0.2, 0.3, 0.0)
    fixed = Router(RouterSpec(scoring="sigmoid", score_bias=b), 4, 4, 1)
    fixed.train()
    fixed(torch.randn(32, 4))
    fixed.update_bias()
    assert fixed.bias_E.tolist() == pytest.approx(list(b))
    moving = Router(RouterSpec(scoring="sigmoid", score_bias=b, balance="bias", bias_rate=0.01), 4, 4, 1)
    moving.pending_counts_E.copy_(torch.tensor([5.0, 1.0, 2.0, 0.0]))  # mean 2
    moving.update_bias()
    assert moving.bias_E.tolist() == pytest.approx([0.09, -0.19, 0.3, 0.01])


@pytest.mark.parametrize("bias, match", [((0.0,) * 5, "one per expert .n_experts = 6."),
                                         ((0.0,) * 5 + (float("nan"),), "finite")])
def test_score_bias_is_validated(bias, match):
    with pytest.raises(ValidationError, match=match):
        _spec(router={"score_bias": bias})


# ------------------------------------------------------------------------------------------------ jitter
def test_jitter_multiplies_the_router_input_in_training_only():
    j, D, E, K = 0.2, 16, 6, 2
    r = Router(RouterSpec(jitter_noise=j), D, E, K)
    torch.nn.init.normal_(r.wr_DE)
    x_TD = torch.randn(256, D)
    r.train()
    torch.manual_seed(7)
    out = r(x_TD)
    torch.manual_seed(7)
    u_TD = torch.empty_like(x_TD).uniform_(1 - j, 1 + j)
    s = ((x_TD * u_TD).double() @ r.wr_DE.double()).softmax(-1)
    idx = s.topk(K, dim=-1).indices
    p = s.gather(1, idx)
    assert torch.equal(out.idx_TK, idx) and rel_err(out.p_TK.double(), p / p.sum(-1, keepdim=True)) <= 1e-6
    clean = (x_TD.double() @ r.wr_DE.double()).softmax(-1).topk(K, dim=-1).indices
    assert not torch.equal(out.idx_TK, clean)  # 256 tokens: the noise moves some choices
    r.eval()
    assert torch.equal(r(x_TD).idx_TK, clean)


def test_jitter_leaves_the_experts_input_clean():
    spec = _spec(router={"jitter_noise": 0.3})
    layer = build_layer(spec, registry.get("naive"), seed=3).double().train()
    x_TD = torch.randn(40, 16, dtype=torch.float64)
    torch.manual_seed(0)
    y_TD, r = layer(x_TD)
    ref_TD = registry.get("naive").forward(x_TD, r.idx_TK, r.p_TK.double(), layer.w1_EDF2, layer.w2_EFD)
    assert rel_err(y_TD, ref_TD) <= 1e-12


def test_options_default_off_and_keys_unchanged():
    """The new fields are defaults that exclude_defaults leaves out of the key: old keys stay valid."""
    m = preset("tiny-layer")
    assert (m.shared_gate, m.d_head, m.router.score_bias, m.router.jitter_noise) == (False, None, None, 0.0)
    dumped = m.model_dump(mode="json", exclude_defaults=True)
    assert not {"shared_gate", "d_head"} & set(dumped) and "router" not in dumped
    wl = Workload(seq=8)
    k = Case(model=m, backend="naive", workload=wl).key
    jittered = preset("tiny-layer", router={"jitter_noise": 0.01})
    assert Case(model=jittered, backend="naive", workload=wl).key != k
    with pytest.raises(ValidationError, match="less than 1"):
        RouterSpec(jitter_noise=1.0)
