"""Router formulas on small hand-computed cases, and the two balance strategies doing their job.

Most cases use D = E and wr_DE = identity, so the router's logits are the input rows themselves."""
import math

import pytest
import torch

from moebench import metrics
from moebench.model import MoE
from moebench.registry import get
from moebench.routing import Router, capacity, capacity_keep, dropped_fraction, ramp, slot_positions
from moebench.spec import ModelSpec, RouterSpec

ln = math.log


def router(E, K, **spec) -> Router:
    r = Router(RouterSpec(**spec), E, E, K)
    with torch.no_grad():
        r.wr_DE.copy_(torch.eye(E))
    return r


def rows(*logits):
    return torch.tensor(logits, dtype=torch.float32)


def test_softmax_topk_weights_normalised_and_not():
    x = rows([0.0, ln(2), ln(3), ln(4)])          # softmax = [1, 2, 3, 4] / 10
    out = router(4, 2, scoring="softmax")(x)
    assert out.idx_TK.tolist() == [[3, 2]]
    torch.testing.assert_close(out.p_TK, torch.tensor([[4 / 7, 3 / 7]]))
    raw = router(4, 2, scoring="softmax", norm_topk=False)(x)
    torch.testing.assert_close(raw.p_TK, torch.tensor([[0.4, 0.3]]))
    assert out.counts_E.tolist() == [0, 0, 1, 1]


def test_temperature_divides_logits():
    x = rows([0.0, ln(4), ln(9), ln(16)])          # / 2 -> [0, ln 2, ln 3, ln 4]
    out = router(4, 1, scoring="softmax", temperature=2.0, norm_topk=False)(x)
    assert out.idx_TK.tolist() == [[3]]
    torch.testing.assert_close(out.p_TK, torch.tensor([[0.4]]))


def test_sigmoid_topk_normalised_and_scaled():
    x = rows([0.0, ln(3), -ln(3), ln(9)])          # sigmoid = [0.5, 0.75, 0.25, 0.9]
    out = router(4, 2, scoring="sigmoid", route_scale=2.5)(x)
    assert out.idx_TK.tolist() == [[3, 1]]
    torch.testing.assert_close(out.p_TK, torch.tensor([[0.9 / 1.65 * 2.5, 0.75 / 1.65 * 2.5]]))


def logit(p):
    return math.log(p / (1 - p))


def test_group_limited_selection_skips_the_best_expert_of_a_weak_group():
    s = [0.95, 0.05, 0.7, 0.6, 0.65, 0.5, 0.1, 0.1]   # groups {0,1} {2,3} {4,5} {6,7}: best-two sums
    x = rows([logit(v) for v in s])                     # 1.0, 1.3, 1.15, 0.2 -> groups 1 and 2 survive
    free = router(8, 2, scoring="sigmoid")(x)
    assert free.idx_TK.tolist() == [[0, 2]]
    grouped = router(8, 2, scoring="sigmoid", n_group=4, topk_group=2)(x)
    assert grouped.idx_TK.tolist() == [[2, 4]]
    torch.testing.assert_close(grouped.p_TK, torch.tensor([[0.7 / 1.35, 0.65 / 1.35]]))


def test_aux_loss_value():
    # t0: s = [0.75, 0.25], t1: s = [0.6, 0.4]; both pick expert 0: f = [1, 0], P = [0.675, 0.325]
    x = rows([ln(3), 0.0], [ln(1.5), 0.0])
    out = router(2, 1, scoring="softmax", balance="aux", aux_alpha=0.1)(x)
    assert out.idx_TK.tolist() == [[0], [0]]
    torch.testing.assert_close(out.aux["aux_loss"], torch.tensor(0.1 * 2 * (1.0 * 0.675 + 0.0 * 0.325)))


def test_aux_loss_with_sigmoid_normalises_scores():
    # sigmoid [0.75, 0.25] -> s' = [0.75, 0.25]; [0.9, 0.5] -> s' = [0.9/1.4, 0.5/1.4]; K=1 picks expert 0 twice
    x = rows([ln(3), -ln(3)], [ln(9), 0.0])
    out = router(2, 1, scoring="sigmoid", balance="aux", aux_alpha=1.0)(x)
    P0 = (0.75 + 0.9 / 1.4) / 2
    torch.testing.assert_close(out.aux["aux_loss"], torch.tensor(2 * P0))


def test_z_loss_value_independent_of_balance():
    x = rows([ln(3), 0.0], [ln(1.5), 0.0])        # logsumexp: ln 4 and ln 2.5
    want = 0.01 * (ln(4) ** 2 + ln(2.5) ** 2) / 2
    for balance in ("none", "aux", "bias"):
        out = router(2, 1, balance=balance, z_loss=0.01)(x)
        torch.testing.assert_close(out.aux["z_loss"], torch.tensor(want))
    assert "z_loss" not in router(2, 1)(x).aux


def test_no_aux_terms_in_eval_mode():
    r = router(2, 1, balance="aux", z_loss=0.01).eval()
    assert r(rows([1.0, 0.0])).aux == {}


def test_bias_update_rule():
    r = router(3, 1, scoring="sigmoid", balance="bias", bias_rate=0.01)
    r.pending_counts_E.copy_(torch.tensor([5.0, 1.0, 2.0]))   # mean 8/3
    r.update_bias()
    torch.testing.assert_close(r.bias_E, torch.tensor([-0.01, 0.01, 0.01]))
    assert r.pending_counts_E.tolist() == [0.0, 0.0, 0.0]
    r.pending_counts_E.copy_(torch.tensor([2.0, 2.0, 2.0]))   # balanced: sign(0) = 0, no change
    r.update_bias()
    torch.testing.assert_close(r.bias_E, torch.tensor([-0.01, 0.01, 0.01]))
    assert r.step == 2


def test_bias_picks_but_gate_weight_comes_from_scores():
    r = router(3, 1, scoring="sigmoid", balance="bias", norm_topk=False)
    r.bias_E.copy_(torch.tensor([0.0, 0.5, 0.0]))
    out = r(rows([ln(3), 0.0, -ln(3)]))        # s = [0.75, 0.5, 0.25]; s + b = [0.75, 1.0, 0.25]
    assert out.idx_TK.tolist() == [[1]]
    torch.testing.assert_close(out.p_TK, torch.tensor([[0.5]]))
    torch.testing.assert_close(r.pending_counts_E, torch.tensor([0.0, 1.0, 0.0]))


def test_expert_choice_each_expert_takes_its_top_C_tokens():
    # T=4, E=2, K=1, cf=1 -> C = 2. softmax score of expert 0 per token (expert 1: one minus it)
    x = rows(*[[logit(v), 0.0] for v in [0.9, 0.8, 0.3, 0.6]])
    out = router(2, 1, scoring="softmax", kind="expert_choice")(x)
    assert out.tok_S.tolist() == [0, 1, 2, 3]             # expert 0: t0 (.9), t1 (.8); expert 1: t2 (.7), t3 (.4)
    assert out.idx_TK.squeeze(1).tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(out.p_TK.squeeze(1), torch.tensor([0.9, 0.8, 0.7, 0.4]))
    assert out.counts_E.tolist() == [2, 2]
    torch.testing.assert_close(out.dropped, torch.tensor(0.0))
    # T=6 -> C = 3. expert 0: t4 (.95), t0 (.9), t5 (.85); expert 1: t2 (.9), t3 (.8), t1 (.2)
    x = rows(*[[logit(v), 0.0] for v in [0.9, 0.8, 0.1, 0.2, 0.95, 0.85]])
    out = router(2, 1, scoring="softmax", kind="expert_choice")(x)
    assert out.tok_S.tolist() == [4, 0, 5, 2, 3, 1]
    # sigmoid scores: both experts rank t0, t1 first, so t2, t3 are served by no expert
    x = rows(*[[logit(a), logit(b)] for a, b in [(0.9, 0.85), (0.8, 0.75), (0.2, 0.3), (0.1, 0.2)]])
    out = router(2, 1, scoring="sigmoid", kind="expert_choice")(x)
    assert out.tok_S.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(out.p_TK.squeeze(1), torch.tensor([0.9, 0.8, 0.85, 0.75]))
    torch.testing.assert_close(out.dropped, torch.tensor(0.5))


def test_expert_choice_layer_output_is_the_sum_over_choosing_experts():
    torch.manual_seed(0)
    spec = ModelSpec(d_model=8, d_expert=6, n_experts=4, top_k=2, n_heads=1,
                     router=RouterSpec(kind="expert_choice", capacity_factor=1.0))
    layer = MoE(spec, get("naive")).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(10, 8, dtype=torch.float64)
    y, _ = layer(x)
    s = (x @ layer.router.wr_DE).softmax(-1)
    C = capacity(10, 2, 4, 1.0)                            # ceil(10*2/4) = 5
    want = torch.zeros_like(x)
    for e in range(4):
        for t in s[:, e].topk(C).indices.tolist():
            h = x[t] @ layer.w1_EDF2[e]
            want[t] += s[t, e] * ((torch.nn.functional.silu(h[:6]) * h[6:]) @ layer.w2_EFD[e])
    # the router scores in fp32 by design (moebench.routing: autocast off, x.float() @ wr.float()), so the gate
    # weights carry fp32 rounding (u = 2**-24 = 6e-8 per operation; a D=8 dot and a softmax: a few 1e-7 relative,
    # 5.6e-8 seen on one CPU, elementwise up to 2e-7 on another); 1e-6 (~16 u) holds that, while leaving out any
    # one (token, expert) pair moves it to 7e-3 or more
    assert metrics.rel_err(y, want) <= 1e-6
    y.sum().backward()
    assert layer.router.wr_DE.grad.abs().sum() > 0


def test_capacity_formula():
    assert capacity(64, 2, 6, 1.25) == 27        # ceil(26.67)
    assert capacity(100, 1, 11, 1.1) == 10       # exactly 10, not 11 from float error
    assert capacity(8, 2, 4, 1.0) == 4
    assert capacity(1, 1, 64, 1.0) == 1


def test_capacity_positions_rank_major_and_dropping():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # rank 0: t0->0 (pos 0), t1->0 (1), t2->0 (2), t3->1 (0); rank 1: t0->1 (1), t1->2 (0), t2->1 (2), t3->0 (3)
    assert slot_positions(idx, 3).tolist() == [[0, 1], [1, 0], [2, 2], [0, 3]]
    assert capacity_keep(idx, 3, 2).tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert dropped_fraction([4, 3, 1], 2) == 3 / 8
    assert dropped_fraction([[4, 3, 1], [2, 2, 2]], 2) == 3 / 14


def test_router_capacity_null_expert_vs_renormalise():
    # T=2, E=2, K=2 (every token takes both experts), cf=0.5 -> C = 1: rank 0 fills both experts
    x = rows([ln(3), 0.0], [0.0, ln(3)])       # softmax [.75, .25] and [.25, .75]
    kw = {"scoring": "softmax", "capacity_factor": 0.5}
    renorm = router(2, 2, **kw)(x)              # t0 keeps expert 0, t1 keeps expert 1; 2nd choices dropped
    assert renorm.idx_TK.tolist() == [[0, 1], [1, 0]]
    torch.testing.assert_close(renorm.p_TK, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    null = router(2, 2, null_expert=True, **kw)(x)
    torch.testing.assert_close(null.p_TK, torch.tensor([[0.75, 0.0], [0.75, 0.0]]))
    torch.testing.assert_close(null.dropped, torch.tensor(0.5))
    assert null.counts_E.tolist() == [2, 2]     # counts are the demand, drops are reported apart


def test_ramps():
    assert [ramp(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 0) == 1.0
    x = rows([ln(3), 0.0], [ln(1.5), 0.0])
    r = router(2, 1, scoring="softmax", balance="aux", aux_alpha=0.1, aux_ramp_steps=4,
               moe_warmup_steps=2, norm_topk=False)
    out = r(x)
    torch.testing.assert_close(out.aux["aux_loss"], torch.tensor(0.25 * 0.135))
    torch.testing.assert_close(out.p_TK, torch.tensor([[0.75 / 2], [0.6 / 2]]))
    for _ in range(3):
        r.update_bias()
    out = r(x)
    torch.testing.assert_close(out.aux["aux_loss"], torch.tensor(0.135))
    torch.testing.assert_close(out.p_TK, torch.tensor([[0.75], [0.6]]))
    r2 = router(2, 1)
    r2.load_state_dict(r.state_dict())          # the step travels with the state dict (checkpoints)
    assert r2.step == 3


def test_router_stays_fp32_under_autocast():
    torch.manual_seed(0)
    r = Router(RouterSpec(scoring="sigmoid"), 16, 8, 2)
    torch.nn.init.normal_(r.wr_DE)
    x = torch.randn(32, 16)
    ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x)
    assert got.p_TK.dtype == torch.float32
    assert torch.equal(got.idx_TK, ref.idx_TK)
    torch.testing.assert_close(got.p_TK, ref.p_TK)


def skewed_router(balance: str, seed=0, **kw) -> Router:
    """E=8, K=2 sigmoid router whose weights favour experts 0 and 1 for every input."""
    g = torch.Generator().manual_seed(seed)
    r = Router(RouterSpec(scoring="sigmoid", balance=balance, **kw), 16, 8, 2)
    with torch.no_grad():
        r.wr_DE.copy_(torch.randn(16, 8, generator=g) * 0.1)
        r.wr_DE[:, :2] += 0.15                  # x has mean 1 below: logits of experts 0, 1 are ~ +2.4 higher
    return r


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(256, 16, generator=g) + 1.0 for _ in range(n)]


def test_bias_balancing_drives_a_skewed_router_to_balance():
    r, ctl = skewed_router("bias", bias_rate=0.01), skewed_router("none")
    mv, mv_ctl = [], []
    for x in batches(200):
        mv.append(metrics.balance(r(x).counts_E.tolist())["maxvio"])
        mv_ctl.append(metrics.balance(ctl(x).counts_E.tolist())["maxvio"])
        r.update_bias()
    assert mv[0] > 2.5 and min(mv_ctl) > 2.5               # experts 0, 1 take (nearly) everything: MaxVio ~ 3
    last = sum(mv[-30:]) / 30                              # balanced (up to sampling noise) once b has moved
    assert last < 0.4 and last < 0.15 * sum(mv_ctl[-30:]) / 30
    assert r.bias_E[:2].max() < r.bias_E[2:].min()         # the hot experts were pushed down


def test_aux_loss_gradient_reaches_router_weights_and_balances():
    r, ctl = skewed_router("aux", aux_alpha=1.0), skewed_router("aux", aux_alpha=1.0)
    x0 = batches(1)[0]
    r(x0).aux["aux_loss"].backward()
    assert r.wr_DE.grad is not None and r.wr_DE.grad.abs().sum() > 0
    assert r.wr_DE.grad[:, :2].mean() > 0                  # descent lowers the hot experts' logits
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    mv = []
    for x in batches(60):
        opt.zero_grad()
        out = r(x)
        out.aux["aux_loss"].backward()
        opt.step()
        mv.append(metrics.balance(out.counts_E.tolist())["maxvio"])
    before = metrics.balance(ctl(x0).counts_E.tolist())["maxvio"]
    assert before > 2.5 and sum(mv[-10:]) / 10 < 0.5 * before


@pytest.mark.parametrize("bad, msg", [
    ({"kind": "expert_choice", "balance": "bias"}, "expert_choice"),
    ({"null_expert": True}, "capacity_factor"),
])
def test_router_spec_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ModelSpec(d_model=8, d_expert=4, n_experts=4, top_k=2, router=RouterSpec(**bad))
