"""Expert-weight memory layouts (moebench.registry.WEIGHT_LAYOUTS): the MoE layer stores w1/w2 the way a backend
asks, with the canonical shapes and the same values, and the harness checks and times the backend on that storage.
Also the SonicMoE adapter's glue (implementations/peers/sonicmoe.py), against stand-ins that follow SonicMoE's
documented contracts, so a wrong argument or layout shows here, on CPU, before any GPU time is spent on it."""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from implementations.naive import forward as naive_forward
from implementations.peers import sonicmoe as peer
from moebench import harness, registry, report
from moebench.metrics import rel_err
from moebench.model import build_layer, expert_weights, in_layout
from moebench.registry import _REGISTRY, Backend, register, unregister
from moebench.spec import Case, Workload, preset


def _linear_stored(w1_EDF2, w2_EFD) -> bool:
    return w1_EDF2.transpose(1, 2).is_contiguous() and w2_EFD.transpose(1, 2).is_contiguous()


seen: list[bool] = []


def _linear_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    """naive's function; notes whether the weights arrived nn.Linear-stored (the harness must give them so)."""
    seen.append(_linear_stored(w1_EDF2, w2_EFD))
    return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)


@pytest.fixture
def linear_backend():
    b = register(Backend("test-linear", _linear_forward, "test only: naive on linear-stored weights",
                         weight_layout="linear"))
    seen.clear()
    yield b
    unregister(b.name)


def test_unknown_weight_layout_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="backend 'bad'.*weight_layout 'rowmajor'.*canonical, linear"):
        register(Backend("bad", _linear_forward, "x", weight_layout="rowmajor"))
    assert "bad" not in _REGISTRY


def test_expert_weights_layouts():
    w1, w2 = expert_weights(3, 8, 5, "linear")
    assert w1.shape == (3, 8, 10) and w2.shape == (3, 5, 8)
    assert _linear_stored(w1, w2) and not w1.is_contiguous()
    c1, c2 = expert_weights(3, 8, 5)
    assert c1.is_contiguous() and c2.is_contiguous()
    src1, src2 = torch.randn(3, 8, 10), torch.randn(3, 5, 8)
    l1, l2 = in_layout(src1, src2, "linear")
    assert _linear_stored(l1, l2) and torch.equal(l1, src1) and torch.equal(l2, src2)
    with pytest.raises(ValueError, match="canonical, linear"):
        expert_weights(3, 8, 5, "rowmajor")


def test_layer_stores_the_backends_layout_with_the_same_values(linear_backend):
    spec = preset("tiny")
    lin = build_layer(spec, linear_backend, seed=3).to(dtype=torch.bfloat16)
    can = build_layer(spec, registry.get("naive"), seed=3).to(dtype=torch.bfloat16)
    assert _linear_stored(lin.w1_EDF2, lin.w2_EFD)  # .to(dtype) keeps the storage order
    assert can.w1_EDF2.is_contiguous() and can.w2_EFD.is_contiguous()
    for name, p in can.named_parameters():
        assert torch.equal(dict(lin.named_parameters())[name], p), name
    x = torch.randn(32, spec.d_model, dtype=torch.bfloat16)
    y, _ = lin(x)
    y.float().square().sum().backward()
    assert seen == [True]
    assert lin.w1_EDF2.grad.stride() == lin.w1_EDF2.stride()  # AdamW states follow the parameter's layout


@pytest.mark.parametrize("level", ["layer", "model"])
def test_harness_checks_and_times_on_the_backends_storage(linear_backend, level):
    wl = Workload(level=level, mode="train", batch=2, seq=16, dtype="float32", warmup=1, repeats=2)
    rec = harness.run_case(Case(model=preset("tiny"), backend="test-linear", workload=wl, max_time_s=0.3), "t", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["weight_layout"] == "linear"
    assert rec["metrics"]["parity"]["ok"]
    assert seen and all(seen)  # parity and every timed step got linear-stored weights, none a copy
    base = harness.run_case(Case(model=preset("tiny"), backend="naive", workload=wl, max_time_s=0.3), "t", {})
    assert base["metrics"]["weight_layout"] == "canonical"
    labels = report.frame([rec, base])["backend_label"].tolist()
    assert labels == ["test-linear [linear weights]", "naive"]  # the report tells the storage apart


# ------------------------------------------------------------------ SonicMoE glue, against its documented contracts
def _experts(x_SD, e_S, w1, w2, concat):
    """Per slot: h = x @ w1[:, :, e].T (gate/up rows concatenated or interleaved), a = silu(g) * u, a @ w2[:, :, e].T."""
    h_SF2 = torch.einsum("sd,fds->sf", x_SD, w1[:, :, e_S])
    g, u = (h_SF2.chunk(2, dim=-1) if concat else (h_SF2[:, 0::2], h_SF2[:, 1::2]))
    return torch.einsum("sf,dfs->sd", F.silu(g) * u, w2[:, :, e_S])


def _check_weights(*ws):
    """SonicMoE's weight format: w1 (2I, H, E) and w2 (H, I, E), both with stride order (2, 0, 1)."""
    for w in ws:
        assert w.stride(1) == 1 and w.stride(2) > w.stride(0) > 1, w.stride()


class _SonicStandIn:
    """sonicmoe 0.1.2.post1 as documented in its sources: moe_general_routing_inputs, and the fixed-K layer body
    (TC_topk_router_metadata_triton + _UpProjection / _DownProjection) with its index conventions:
    sorted row j holds slot s_scatter[j] of token x_gather[j]; s_reverse[slot] is the slot's sorted row."""

    def __init__(self):
        self.calls = []
        root = types.ModuleType("sonicmoe")
        root.moe_general_routing_inputs = self.general
        enums = types.ModuleType("sonicmoe.enums")
        enums.ActivationType = types.SimpleNamespace(SWIGLU="swiglu")
        func = types.ModuleType("sonicmoe.functional")
        func._UpProjection = types.SimpleNamespace(apply=self.up)
        func._DownProjection = types.SimpleNamespace(apply=self.down)
        tk = types.ModuleType("sonicmoe.functional.triton_kernels")
        tk.TC_topk_router_metadata_triton = self.metadata
        self.modules = {"sonicmoe": root, "sonicmoe.enums": enums, "sonicmoe.functional": func,
                        "sonicmoe.functional.triton_kernels": tk}

    def general(self, x, scores, token_S, expert_S, w1, b1, w2, b2, E, stream_id, act, inference, concat=False):
        self.calls.append(("general", concat))
        assert token_S.dtype == expert_S.dtype == torch.int32 and scores.dtype == torch.float32
        assert bool((token_S[1:] >= token_S[:-1]).all()), "token_indices must be sorted ascending"
        assert b1 is None and b2 is None and act == "swiglu" and x.is_contiguous()
        _check_weights(w1, w2)
        o_SD = _experts(x[token_S.long()], expert_S.long(), w1, w2, concat) * scores.unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_S.long(), o_SD)
        return y, torch.bincount(expert_S.long(), minlength=w2.shape[-1]).to(torch.int32)

    def metadata(self, idx_TK, E, freq_E, offs_E1, x_gather_S, s_scatter_S, s_reverse_S):
        assert idx_TK.dtype == torch.int32 and idx_TK.dim() == 2
        T, K = idx_TK.shape
        order = torch.sort(idx_TK.reshape(-1).long(), stable=True).indices
        freq_E.copy_(torch.bincount(idx_TK.reshape(-1).long(), minlength=E))
        offs_E1.copy_(torch.cat([torch.zeros(1, dtype=torch.long), freq_E.long().cumsum(0)]))
        s_scatter_S.copy_(order)
        x_gather_S.copy_(order // K)
        s_reverse_S.copy_(torch.empty_like(order).scatter_(0, order, torch.arange(T * K)))

    def up(self, x, w1, b1, offs_E1, TK, K, x_gather, s_scatter, s_reverse, var_offs, varlen, act, inference, concat):
        self.calls.append(("top_k", concat))
        assert b1 is None and var_offs is None and varlen is False and act == "swiglu" and TK == x_gather.numel()
        _check_weights(w1)
        e_S = torch.repeat_interleave(torch.arange(offs_E1.numel() - 1), (offs_E1[1:] - offs_E1[:-1]).long())
        xs = x[x_gather.long()]
        h = torch.einsum("sd,fds->sf", xs, w1[:, :, e_S])
        g, u = h.chunk(2, dim=-1) if concat else (h[:, 0::2], h[:, 1::2])
        self.e_S = e_S
        return F.silu(g) * u, (None if inference else h)

    def down(self, a, h, w2, b2, scores_TK, offs_E1, T, K, x_gather, s_scatter, s_reverse, var_offs, varlen, act):
        assert b2 is None and var_offs is None and varlen is False and scores_TK.shape == (T, K)
        _check_weights(w2)
        assert scores_TK.dtype == torch.float32
        y_SD = torch.einsum("sf,dfs->sd", a, w2[:, :, self.e_S])  # sorted rows
        s = scores_TK.reshape(-1)[s_scatter.long()].to(a.dtype)
        o_SD = y_SD * s.unsqueeze(-1)
        return o_SD[s_reverse.long()].view(T, K, -1).sum(1)  # per token, its K slots' sorted rows


@pytest.fixture
def sonic(monkeypatch):
    stand_in = _SonicStandIn()
    for name, mod in stand_in.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return stand_in


@pytest.mark.parametrize("routing_path", ["general", "top_k"])
@pytest.mark.parametrize("gate_up", ["concat", "interleaved"])
@pytest.mark.parametrize("layout", ["linear", "canonical"])
def test_sonicmoe_glue_matches_naive(sonic, routing_path, gate_up, layout):
    T, D, Fh, E, K = 13, 8, 6, 5, 2
    g = torch.Generator().manual_seed(7)
    idx_TK = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
    base = {"x": torch.randn(T, D, generator=g), "p": torch.rand(T, K, generator=g) + 0.1,
            "w1": torch.randn(E, D, 2 * Fh, generator=g) / math.sqrt(D),
            "w2": torch.randn(E, Fh, D, generator=g) / math.sqrt(Fh)}
    dy = torch.randn(T, D, generator=g)

    def run(fn, lay, **opts):
        t = {k: v.double() for k, v in base.items()}
        t["w1"], t["w2"] = in_layout(t["w1"], t["w2"], lay)
        t = {k: v.requires_grad_() for k, v in t.items()}
        y = fn(t["x"], idx_TK, t["p"], t["w1"], t["w2"], **opts)
        y.backward(dy.double())
        return {"y": y.detach()} | {f"d{k}": v.grad for k, v in t.items()}

    ref = run(naive_forward, "canonical")
    got = run(peer.forward, layout, routing_path=routing_path, gate_up=gate_up)
    assert sonic.calls == [(routing_path, gate_up == "concat")]
    for k in ref:  # float64 in, but router scores go to SonicMoE as fp32 (as its own router's are): ~3e-8
        assert rel_err(got[k], ref[k]) <= 1e-6, k


def test_sonicmoe_weights_are_views_of_linear_storage():
    w1, w2 = in_layout(torch.randn(4, 8, 12), torch.randn(4, 6, 8), "linear")
    s1, s2 = peer.sonic_weights(w1, w2, "concat")
    assert s1.data_ptr() == w1.data_ptr() and s2.data_ptr() == w2.data_ptr()  # no copy per call
    _check_weights(s1, s2)
    i1, _ = peer.sonic_weights(w1, w2, "interleaved")
    assert i1.data_ptr() != w1.data_ptr()
    assert torch.equal(i1[0::2], w1.permute(2, 1, 0)[:6]) and torch.equal(i1[1::2], w1.permute(2, 1, 0)[6:])
    assert registry.get("sonicmoe").weight_layout == "linear"
    if importlib.util.find_spec("sonicmoe") is None:
        assert registry.get("sonicmoe").why_not("cuda", "bfloat16") == "sonic-moe not installed"


def test_sonicmoe_bad_option_names_the_choices(sonic):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="routing_path must be one of general, top_k"):
        peer.forward(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), torch.randn(2, 8, 4),
                     torch.randn(2, 2, 8), routing_path="fixed")


def test_sonicmoe_is_imported_with_argv_hidden(tmp_path, monkeypatch):
    """nvidia-cutlass-dsl parses sys.argv with argparse when sonicmoe imports it; under `moebench paired -d cuda`
    (cases run in-process) `-d` matched its `-diagnostic` flag and the import failed. The adapter hides argv."""
    pkg = tmp_path / "argv_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('-diagnostic', choices=['all', 'fail'])\n"
        "p.parse_known_args()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["moebench", "paired", "-s", "h100", "-d", "cuda"])
    with pytest.raises(SystemExit):  # what importing it with paired's argv did
        importlib.import_module("argv_probe_pkg")
    sys.modules.pop("argv_probe_pkg", None)
    assert peer._import("argv_probe_pkg").p is not None
    assert sys.argv == ["moebench", "paired", "-s", "h100", "-d", "cuda"]  # restored
    sys.modules.pop("argv_probe_pkg", None)
