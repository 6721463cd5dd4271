"""Routing traces (moebench/traces.py, moebench/record.py, `moebench trace`): recorded from tiny random-weight
transformers MoE models saved to disk and loaded by path, replayed through routing.fixed_routing (what the
harness calls), validated against the case's model, resolved relative to the suite file.
Legend: L layers, T tokens, K top-k, E experts."""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from moebench import harness, record, traces
from moebench.cli import app
from moebench.paths import SUITES_DIR
from moebench.routing import fixed_idx, fixed_routing
from moebench.spec import Case, Workload, preset
from moebench.suite import SuiteError, load

pytest.importorskip("transformers")
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tiny_hf", HERE / "data" / "tiny_hf.py")
tiny_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_hf)
EXAMPLE = SUITES_DIR / "traces" / "tiny-olmoe-e6k2.npz"
runner = CliRunner()


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """A tiny OLMoE (E 6, K 2, 2 layers) on disk, and a trace recorded from it in two forward passes."""
    d = tmp_path_factory.mktemp("olmoe")
    model_dir = tiny_hf.tiny_model(d / "model", "olmoe", E=6, K=2, layers=2, seed=1)
    tr = record.record(model_dir, tiny_hf.TEXT, d / "t.npz", tokens=300, seq=160)
    return model_dir, d / "t.npz", tr


def test_recorded_choices_are_the_models_own(olmoe):
    """Independent of the hooks: the model's router logits (output_router_logits) give the same top-k per
    layer."""
    import transformers
    model_dir, _, tr = olmoe
    assert tr.shape == (2, 300, 2) and tr.n_experts == 6 and tr.top_k == 2 and tr.p_LTK is not None
    assert tr.meta["layers"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = tiny_hf.byte_tokenizer()(tiny_hf.TEXT.read_text(), add_special_tokens=False)["input_ids"][:300]
    logits = {0: [], 1: []}
    with torch.no_grad():
        for s in (0, 160):  # the same two passes as the recording
            out = model(input_ids=torch.tensor([ids[s:s + 160]]), output_router_logits=True, use_cache=False)
            for li in (0, 1):
                logits[li].append(out.router_logits[li].reshape(-1, 6))
    for li in (0, 1):
        probs_TE = torch.cat(logits[li]).float().softmax(-1)
        top = probs_TE.topk(2, dim=-1)
        assert torch.equal(torch.from_numpy(tr.idx_LTK[li].astype(np.int64)), top.indices)
        assert np.allclose(tr.p_LTK[li], top.values.numpy(), rtol=1e-5, atol=1e-6)  # norm_topk_prob false
    counts = np.bincount(tr.idx_LTK[0].ravel(), minlength=6)
    assert counts.min() < counts.max()  # not uniform: the replay carries real skew


def _rotation(rec: np.ndarray, got: np.ndarray) -> int | None:
    """The shift s with got == rec rolled by -s (rows off..T-1 then 0..off-1), or None."""
    shifts = [s for s in range(len(rec)) if np.array_equal(np.roll(rec, -s, axis=0), got)]
    return shifts[0] if shifts else None


def test_replay_returns_the_recorded_choices(olmoe):
    """The recorded tokens in order, from a seeded offset, wrapping around (tiled past the end)."""
    _, path, tr = olmoe
    routing = f"trace:{traces.stored_path(path)}"
    for layer in (0, 1, 3):  # layer 3 of a deeper model replays recorded layer 1
        idx_TK, p_TK = fixed_routing(routing, 300, 6, 2, seed=7, layer=layer)
        s = _rotation(tr.idx_LTK[layer % 2].astype(np.int64), idx_TK.numpy())
        assert s is not None and np.array_equal(np.roll(tr.p_LTK[layer % 2], -s, axis=0), p_TK.numpy())
    assert torch.equal(fixed_idx(routing, 300, 6, 2, seed=7), fixed_idx(routing, 300, 6, 2, seed=7))  # seeded
    assert not torch.equal(fixed_idx(routing, 300, 6, 2, seed=7), fixed_idx(routing, 300, 6, 2, seed=8))
    long_TK = fixed_idx(routing, 750, 6, 2, seed=3)  # tiled: more tokens than recorded
    assert torch.equal(long_TK[:300], long_TK[300:600]) and torch.equal(long_TK[600:], long_TK[:150])
    assert _rotation(tr.idx_LTK[0].astype(np.int64), long_TK[:300].numpy()) is not None
    short_TK = fixed_idx(routing, 40, 6, 2, seed=3)  # fewer: a window of consecutive recorded tokens
    assert torch.equal(short_TK, long_TK[:40])
    with pytest.raises(traces.TraceError, match="E=6, K=2"):
        fixed_idx(routing, 16, 8, 2, seed=0)


def test_synthetic_routing_unchanged_through_fixed_idx():
    from moebench.routing import synthetic_idx
    assert torch.equal(fixed_idx("zipf:1.2", 64, 8, 2, seed=5), synthetic_idx("zipf:1.2", 64, 8, 2, seed=5))
    with pytest.raises(ValueError, match="learned"):
        fixed_idx("learned", 8, 4, 2, seed=0)


def test_qwen2_moe_records_routed_gates_only(tmp_path):
    """Qwen2-MoE: a dense first layer (mlp_only_layers) and a shared_expert_gate (a (1, D) Linear) are no
    routers."""
    model_dir = tiny_hf.tiny_model(tmp_path / "m", "qwen2_moe", E=4, K=2, layers=3, seed=0)
    tr = record.record(model_dir, tiny_hf.TEXT, tmp_path / "q.npz", tokens=64, seq=64)
    assert tr.meta["layers"] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert tr.shape == (2, 64, 2) and tr.meta["model_type"] == "qwen2_moe"


def test_router_output_parsing():
    T, E, K = 5, 4, 2
    logits_TE = torch.randn(T, E)
    idx, p = record.parse_router_output(logits_TE, T, E, K)  # a plain Linear gate: logits only
    assert torch.equal(idx, logits_TE.topk(K, dim=-1).indices) and p is None
    w_TK, i_TK = torch.rand(T, K), torch.randint(0, E, (T, K))
    idx, p = record.parse_router_output((logits_TE, w_TK, i_TK), T, E, K)
    assert torch.equal(idx, i_TK) and torch.equal(p, w_TK)
    with pytest.raises(record.RecordError, match="neither"):
        record.parse_router_output(torch.randn(T, E + 1), T, E, K)


def test_trace_file_is_validated(tmp_path):
    idx_LTK = np.argsort(np.random.default_rng(0).random((2, 10, 5)), axis=-1)[..., :2]  # 2 distinct of 5
    meta = {"n_experts": 5, "top_k": 2, "model": "x", "layers": ["a", "b"]}
    p = traces.save(tmp_path / "ok.npz", idx_LTK, None, meta)
    t = traces.load(str(p))
    assert t.idx_LTK.dtype == np.int16 and np.array_equal(t.idx_LTK, idx_LTK) and t.meta["tokens"] == 10
    with pytest.raises(traces.TraceError, match="outside 0..4"):
        traces.save(tmp_path / "bad.npz", idx_LTK + 1, None, meta)
    twice = idx_LTK.copy()
    twice[1, 3, 1] = twice[1, 3, 0]
    with pytest.raises(traces.TraceError, match="picks the same expert twice"):
        traces.save(tmp_path / "twice.npz", twice, None, meta)
    with pytest.raises(traces.TraceError, match="does not exist"):
        traces.load(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(traces.TraceError, match="junk.npz: not a moebench trace"):
        traces.header(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(traces.TraceError, match="needs arrays meta and idx_LTK"):
        traces.header(str(tmp_path / "other.npz"))


def test_case_names_the_file_and_both_E_K_on_a_mismatch():
    routing = f"trace:{traces.stored_path(EXAMPLE)}"
    Case(model=preset("tiny-layer"), backend="naive", workload=Workload(seq=64, routing=routing))  # E 6, K 2
    with pytest.raises(ValidationError) as e:
        Case(model=preset("tiny"), backend="naive", workload=Workload(seq=64, routing=routing))
    msg = str(e.value)
    for s in ("tiny-olmoe-e6k2.npz", "E=6, K=2", "model 'tiny' has E=4, K=2"):
        assert s in msg, msg
    with pytest.raises(ValidationError, match="routing must be"):
        Workload(seq=8, routing="trace:")


def test_suite_trace_path_is_relative_to_the_suite_file(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "sub" / "t.npz")
    suite = tmp_path / "s.toml"
    body = ('[[matrix]]\nbackends = ["naive"]\nmodels = [{ preset = "tiny-layer" }]\n'
            '[[matrix.workloads]]\nseq = 32\nrouting = "trace:%s"\n')
    suite.write_text(body % "sub/t.npz")
    (c,) = load(str(suite))
    # outside the repository: absolute
    assert c.workload.routing == f"trace:{(tmp_path / 'sub' / 't.npz').resolve()}"
    (ci,) = [c for c in load("ci") if c.workload.routing.startswith("trace:")]
    assert ci.workload.routing == "trace:suites/traces/tiny-olmoe-e6k2.npz"  # shipped: repo-relative
    suite.write_text(body % "sub/nope.npz")
    with pytest.raises(SuiteError) as e:
        load(str(suite))
    assert str(e.value).startswith(str(suite)) and "nope.npz does not exist" in str(e.value)


def test_committed_example_trace():
    t = traces.load(str(EXAMPLE))
    assert EXAMPLE.stat().st_size < 16_000 and t.shape == (2, 512, 2)
    assert (t.n_experts, t.top_k) == (preset("tiny-layer").n_experts, preset("tiny-layer").top_k)
    assert t.meta["text_sha256"] == hashlib.sha256(tiny_hf.TEXT.read_bytes()).hexdigest()
    assert t.meta["model_type"] == "olmoe" and t.p_LTK is not None


def test_the_harness_replays_a_trace_at_layer_level():
    """The ci suite's trace case through harness.run_case: parity on the replayed routing, and the loads it
    records are the trace's own rows."""
    (case,) = [c for c in load("ci") if c.workload.routing.startswith("trace:")]
    rec = harness.run_case(case, "test", {})
    assert rec["status"] == "ok", rec.get("reason")
    idx_TK = fixed_idx(case.workload.routing, case.workload.tokens, 6, 2, seed=case.workload.seed * 1000)
    want_E = np.bincount(idx_TK.numpy().ravel(), minlength=6)
    got_LE = np.asarray(rec["metrics"]["balance"]["counts_global"])
    assert np.array_equal(got_LE[0] / got_LE[0].sum(), want_E / want_E.sum())


def test_trace_command(olmoe, tmp_path):
    model_dir, _, tr = olmoe
    out = tmp_path / "cli.npz"
    res = runner.invoke(app, ["trace", str(model_dir), str(tiny_hf.TEXT), "-o", str(out), "--tokens", "300",
                              "--seq", "160"])
    assert res.exit_code == 0, res.output
    for s in ("model.layers.0.mlp.gate", "max/mean", "entropy", "dead"):
        assert s in res.output
    assert np.array_equal(traces.load(str(out)).idx_LTK, tr.idx_LTK)  # same model and text: same trace


def _one_line_exit_2(args):
    res = runner.invoke(app, args)
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_trace_command_bad_input_exits_2(olmoe, tmp_path):
    model_dir = olmoe[0]
    text = str(tiny_hf.TEXT)
    o = str(tmp_path / "o.npz")
    assert "does not exist" in _one_line_exit_2(["trace", str(tmp_path / "nope"), text, "-o", o])
    dense = tiny_hf.tiny_model(tmp_path / "dense", "llama")
    assert "has no MoE layers" in _one_line_exit_2(["trace", str(dense), text, "-o", o])
    (tmp_path / "empty.txt").write_text("  \n")
    assert "is empty" in _one_line_exit_2(["trace", str(model_dir), str(tmp_path / "empty.txt"), "-o", o])
    bad_device = ["trace", str(model_dir), text, "-o", o, "-d", "tpu"]
    assert "--device must be cpu or cuda" in _one_line_exit_2(bad_device)
    assert not Path(o).exists()
