"""The report's expert-GEMM dtype axis (moebench/report_fp8.py) from SYNTHETIC records (tests/data/synthetic.py, not
measurements): fp8 cases sit beside bf16 grouped_mm in the same panel under their own label, the gemm section gives
each one's speed-up over bf16 grouped_mm and its errors from the parity block, a skipped fp8 backend keeps its reason,
and bf16-vs-fp8 train-runs give the loss gap after the same steps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from moebench import compare, report, results
from moebench.spec import preset

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("synthetic", HERE / "data" / "synthetic.py")
syn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(syn)

LAYER = dict(level="layer", batch=1, seq=16384, routing="uniform", repeats=40)
PARITY = {"ok": True, "errors": {"y": 0.018, "dx": 0.005}, "tol": 0.035, "tols": {"y": 0.035, "dx": 0.02},
          "vs_naive": {"y": 0.066, "dx": 0.041, "dw1": 0.043}, "fp8_cost": {"y": 0.065, "dx": 0.04}}


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(3)
    mix = preset("mixtral-layer")
    bf16 = syn.ok(syn.case(mix, "grouped_mm", **LAYER), rng, 100_000, noise=0.005)
    fp8 = syn.ok(syn.case(mix, "grouped_mm", gemm_dtype="fp8-rowwise", **LAYER), rng, 140_000, noise=0.005)
    fp8["metrics"]["parity"] = PARITY
    skipped = syn.not_ok(syn.case(mix, "torchao_fp8", gemm_dtype="fp8-rowwise-fp8bwd", **LAYER), "skipped",
                         "torchao not installed (pip install torchao)")
    small = preset("moeforge-small")
    tr = dict(level="train-run", train={"steps": 40})
    run = {"steps": 40, "maxvio_start": 1.0, "maxvio_end": 0.1, "decay": 10, "strategy": "aux"}
    t16 = syn.ok(syn.case(small, "grouped_mm", **tr), rng, 30_000, loss_steps=40, train_run=run)
    t8 = syn.ok(syn.case(small, "grouped_mm", gemm_dtype="fp8-rowwise", **tr), rng, 36_000, loss_steps=40, train_run=run)
    t8["metrics"]["train_run"]["final_val_loss"] = t16["metrics"]["train_run"]["final_val_loss"] + 0.05
    return [bf16, fp8, skipped, t16, t8]


@pytest.fixture(scope="module")
def built(records, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    src = syn.write(d / "r.jsonl", records)
    return report.write(results.read([src]), d / "out", [str(src)]), d / "out"


def section(rep, sid):
    return next(s for s in rep.sections if s.id == sid)


def test_gemm_section_gives_speedup_and_errors_per_fp8_case(built, records):
    rep, _ = built
    speed = next(t for t in section(rep, "gemm").tables if t.title.startswith("FP8 expert GEMMs"))
    rows = {r[2]: dict(zip(speed.columns, r)) for r in speed.rows}
    ok = rows["grouped_mm [fp8-rowwise]"]
    tps = [r["metrics"]["tokens_per_s"]["p50"] for r in records[:2]]
    assert ok["speed-up"] == f"{tps[1] / tps[0]:.2f}x" and ok["gemm dtype"] == "fp8-rowwise"
    assert ok["y err vs fp8 reference"] == "1.80% (tol 3.50%)" and ok["y err vs naive"] == "6.60%"
    assert ok["worst grad err vs naive"] == "4.30%" and ok["fp8 cost of the reference"] == "6.50%"
    skipped = rows["torchao_fp8 [fp8-rowwise-fp8bwd]"]
    assert skipped["status"].startswith("skipped: torchao not installed") and skipped["speed-up"] == ""


def test_fp8_and_bf16_share_a_panel_under_distinct_labels(records):
    df = report.frame(records)
    layer = df[df["level"] == "layer"]
    assert layer["workload_base"].nunique() == 1 and layer["group_key"].nunique() == 1
    assert set(layer["backend_label"]) == {"grouped_mm", "grouped_mm [fp8-rowwise]", "torchao_fp8 [fp8-rowwise-fp8bwd]"}
    assert len(report.latest(df[df["level"] == "layer"])) == 3  # fp8 never overwrites its bf16 twin


def test_compare_against_bf16_grouped_mm_includes_the_fp8_case(records):
    cmp = compare.compare_baseline(records[:2], "grouped_mm")
    assert cmp.rows and {r["backend"] for r in cmp.rows} == {"grouped_mm [fp8-rowwise]"}


def test_train_runs_give_the_loss_gap_and_share_a_curve_panel(built, records):
    rep, _ = built
    gap = next(t for t in section(rep, "gemm").tables if t.title.startswith("Training"))
    (row,) = gap.rows
    r = dict(zip(gap.columns, row))
    want = records[4]["metrics"]["train_run"]["final_val_loss"] - records[3]["metrics"]["train_run"]["final_val_loss"]
    assert r["gemm dtype"] == "fp8-rowwise" and r["steps"] == "40" and float(r["val loss gap"]) == pytest.approx(want, rel=1e-3)
    assert section(rep, "training").plots  # both curves drawn (one panel: the workload text has no gemm dtype)


def test_no_gemm_section_without_fp8_records(records, tmp_path):
    rep = report.build(results.Loaded(records=[records[0], records[3]]), ["x"])
    assert "gemm" not in [s.id for s in rep.sections]
