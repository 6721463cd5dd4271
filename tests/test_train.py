"""train-run: the data, the schedule, checkpoint/resume (bitwise on CPU fp32), non-finite loss -> failed, and
what the records carry. Tiny models on CPU."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moebench import data, harness, registry, suite, train
from moebench.routing import capacity, dropped_fraction
from moebench.spec import Case, TrainOptions, Workload, preset


def case(steps=8, router=None, backend="grouped_mm", dtype="float32", **train_opts) -> Case:
    model = preset("tiny", vocab_size=256, router=router or {"scoring": "sigmoid", "balance": "bias"})
    wl = Workload(level="train-run", batch=2, seq=32, dtype=dtype,
                  train={"steps": steps, "lr": 3e-3, "lr_warmup_steps": 2, **train_opts})
    return Case(model=model, backend=backend, workload=wl)


# ------------------------------------------------------------------------------------------------ data
def test_corpus_is_the_stdlib_split_by_file():
    c = data.load()
    info = c.info
    assert info["files_train"] > 100 and info["files_val"] > 5
    assert c.train_N.dtype == torch.uint8 and c.train_N.numel() == info["tokens_train"] > 10**6
    files = data.stdlib_files(Path(info["root"]))
    assert files == sorted(files) and not any(f.startswith(("test/", "site-packages/")) for f in files)
    val = [f for f in files if data.is_val(f)]
    assert len(val) == info["files_val"]
    # the validation stream is exactly the held-out files, in order, each ending with the NUL marker
    want = b"".join((Path(info["root"]) / f).read_bytes().replace(b"\x00", b"") + b"\x00" for f in val)
    assert bytes(c.val_N.numpy()) == want
    assert "import" in bytes(c.train_N[:20000].numpy()).decode("utf-8", "replace")


def test_batches_are_pure_functions_of_seed_and_step():
    tok = data.load().train_N
    a, b = data.train_batch(tok, 4, 16, seed=0, step=7), data.train_batch(tok, 4, 16, seed=0, step=7)
    assert torch.equal(a, b) and a.shape == (4, 16) and a.dtype == torch.long
    assert not torch.equal(a, data.train_batch(tok, 4, 16, seed=0, step=8))
    assert not torch.equal(a, data.train_batch(tok, 4, 16, seed=1, step=7))
    v = data.val_batches(data.load().val_N, 2, 16, 3)
    assert len(v) == 3 and v[0].shape == (2, 16)


# -------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_then_cosine():
    o = TrainOptions(steps=110, lr=1.0, lr_warmup_steps=10, min_lr_ratio=0.1)
    assert [train.lr_at(s, o) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert train.lr_at(10, o) == pytest.approx(1.0)
    assert train.lr_at(60, o) == pytest.approx(0.55)             # half way: (1 + 0.1) / 2
    assert train.lr_at(110, o) == pytest.approx(0.1)
    lrs = [train.lr_at(s, o) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_workload_validation():
    with pytest.raises(ValueError, match="train-run"):
        Workload(level="model", seq=8, train={"steps": 3})
    with pytest.raises(ValueError, match="routing"):
        Workload(level="train-run", seq=8, routing="zipf:1.2")
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        TrainOptions(steps=3, lr_warmup_steps=5)
    with pytest.raises(ValueError, match="vocab_size"):
        Case(model=preset("tiny", vocab_size=100), backend="naive", workload=Workload(level="train-run", seq=8))
    assert Workload(level="train-run", seq=8).train == TrainOptions()
    # layer/model keys do not hash the (absent) train options
    assert "train" not in Workload(seq=8).model_dump(exclude_none=True)


# ------------------------------------------------------------------------------------------ the run
def test_run_records_loss_balance_and_load():
    rec = harness.run_case(case(steps=10, eval_every=5, eval_batches=2), "t", {})   # the harness dispatch
    assert rec["status"] == "ok", rec["reason"]
    json.dumps(rec, allow_nan=False)                                          # storable as a results line
    m = rec["metrics"]
    assert m["parity"]["ok"] and m["tokens_per_s"]["p50"] > 0
    assert len(m["loss_curve"]) == len(m["maxvio_batch"]) == len(m["cv_batch"]) == 10
    assert all(math.isfinite(v) for v in m["loss_curve"])
    assert m["loss_curve"][-1] < m["loss_curve"][0]                       # it learns something
    assert [v["step"] for v in m["val_curve"]] == [5, 10]
    L, E = 2, 4
    assert len(m["maxvio_batch_per_layer"][0]) == L
    assert len(m["load"]["val_final"]) == L and len(m["load"]["val_final"][0]) == E
    assert sum(map(sum, m["load"]["val_final"])) == L * 2 * 2 * 32 * 2   # layers x batches x B x S x K
    assert sum(map(sum, m["load"]["train_last10pct"])) == L * 1 * 2 * 32 * 2
    tr = m["train_run"]
    for k in ("strategy", "final_val_loss", "maxvio_global", "maxvio_batch_last10pct", "dead_experts"):
        assert k in tr
    assert tr["strategy"] == "bias u=0.001"
    assert tr["final_val_loss"] == m["val_curve"][-1]["val_loss"]
    assert tr["maxvio_batch_last10pct"] == m["maxvio_batch"][-1]          # 10% of 10 steps: the last one
    assert tr["maxvio_global"] == m["balance"]["global"]["maxvio"]
    row = train.summary_table([rec]).splitlines()[-1]                      # python -m moebench.train FILE
    assert "bias u=0.001" in row and f"{tr['final_val_loss']:.4f}" in row


def test_resume_continues_the_same_loss_curve_bitwise(tmp_path):
    c = case(steps=12, checkpoint_every=4, eval_every=4, eval_batches=1)
    full = train.run(c, "cpu", checkpoint_dir=tmp_path / "a")

    def crash(step, model):
        if step == 6:
            raise KeyboardInterrupt("simulated crash after step 6")

    with pytest.raises(KeyboardInterrupt):
        train.run(c, "cpu", checkpoint_dir=tmp_path / "b", on_step=crash)
    ck = torch.load(train.checkpoint_path(c, tmp_path / "b"), weights_only=True)
    assert ck["next_step"] == 4
    seen = {}
    resumed = train.run(c, "cpu", checkpoint_dir=tmp_path / "b",
                        on_step=lambda s, m: seen.setdefault("first", s))
    assert seen["first"] == 4 and resumed["train_run"]["resumed_from"] == 4
    for k in ("loss_curve", "lm_loss_curve", "grad_norm_curve", "maxvio_batch", "val_curve"):
        assert resumed[k] == full[k], k                                    # exact float equality
    assert resumed["load"] == full["load"]
    assert resumed["train_run"]["final_val_loss"] == full["train_run"]["final_val_loss"]
    # a finished checkpoint is not resumed: a rerun trains from step 0 again
    again = train.run(c, "cpu", checkpoint_dir=tmp_path / "b", on_step=lambda s, m: seen.setdefault("again", s))
    assert seen["again"] == 0 and again["loss_curve"] == full["loss_curve"]


def test_an_unwritable_checkpoint_is_recorded_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = train.run(case(steps=4, checkpoint_every=2), "cpu", checkpoint_dir=blocker)
    assert len(m["loss_curve"]) == 4 and "cannot write" in m["train_run"]["checkpoint_error"]


def test_a_planted_nan_fails_the_run_at_its_step(monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def ce(*a, **kw):
        out = real(*a, **kw)
        if torch.is_grad_enabled():            # training steps only (validation runs under no_grad)
            calls["n"] += 1
            if calls["n"] == 4:                # step 3 (0-based)
                return out * float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    rec = harness.run_case(case(steps=8), "t", {})
    assert rec["status"] == "failed" and "step 3" in rec["reason"]
    m = rec["metrics"]
    assert m["failed_step"] == 3 and len(m["loss_curve"]) == 3
    json.dumps(rec, allow_nan=False)           # the partial record is storable


def test_an_absurd_learning_rate_fails_with_the_step():
    rec = harness.run_case(case(steps=10, router={"scoring": "softmax"}, lr=1e6), "t", {})
    assert rec["status"] == "failed", rec["status"]
    step = rec["metrics"]["failed_step"]
    assert 0 < step < 10 and len(rec["metrics"]["loss_curve"]) == step
    assert f"at step {step}" in rec["reason"]


@pytest.mark.parametrize("router, backend", [
    ({"balance": "aux", "aux_alpha": 0.01, "aux_ramp_steps": 3, "z_loss": 1e-3}, "shuffle"),
    ({"kind": "expert_choice"}, "grouped_mm"),
    ({"capacity_factor": 1.0, "null_expert": True, "moe_warmup_steps": 3}, "naive"),
    ({"scoring": "sigmoid", "balance": "bias", "n_group": 2, "topk_group": 1}, "capacity"),
])
def test_router_options_train(router, backend):
    m = train.run(case(steps=4, router=router, backend=backend), "cpu")
    assert all(math.isfinite(v) for v in m["loss_curve"])
    if "aux_alpha" in router:
        assert m["aux_loss_curve"][0] > 0 and m["aux_loss_curve"][0] < m["aux_loss_curve"][-1] * 1.5
    if "capacity_factor" in router or backend == "capacity":  # router capacity, or the capacity backend's
        cf = router.get("capacity_factor") or registry.get(backend).options["capacity_factor"]
        w, spec = case().workload, case(router=router).model
        C = capacity(w.tokens, spec.top_k, spec.n_experts, cf)
        drops = m["dropped_curve"]
        assert len(drops) == 4 and m["train_run"]["dropped_frac"] == pytest.approx(np.mean(drops))
        # the last step (= the last 10% of 4 steps) drops what its loads imply: expert i keeps min(c_i, C)
        assert drops[-1] == pytest.approx(dropped_fraction(m["load"]["train_last10pct"], C))
        assert 0 < m["train_run"]["dropped_frac"] < 1  # an untrained router overflows C (0.08 and 0.23 seen)


def test_bf16_autocast_run_on_cpu():
    m = train.run(case(steps=3, dtype="bfloat16"), "cpu")
    assert all(math.isfinite(v) for v in m["loss_curve"])


def test_suites_expand():
    ci = [c for c in suite.load("ci") if c.workload.level == "train-run"]
    assert len(ci) >= 5 and len({train.strategy(c.model.router) for c in ci}) == len(ci)
    bal = suite.load("balance", device="cuda")
    names = {train.strategy(c.model.router) for c in bal}
    assert names == {"none", "aux alpha=0.001", "aux alpha=0.01", "bias u=0.001", "bias u=0.001 + groups 2/4"}
    for c in bal:
        m = c.model
        assert 16 <= m.n_experts <= 64 and 4 <= m.top_k <= 6 and 1 <= m.n_shared_experts <= 2
        assert m.router.scoring == "sigmoid" and c.workload.dtype == "bfloat16"
