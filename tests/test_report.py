"""`moebench report`: every plot type renders from (synthetic) data, plots without data are omitted (no empty
figures), every non-ok case is listed with its reason, and bad input is a clear message naming file and line,
with the good records still used and exit 2 only when nothing usable remains."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from moebench import report, results
from moebench.cli import app

HERE = Path(__file__).resolve().parent
ALL_PLOTS = {"throughput", "speedup", "memory", "tflops", "balance", "expert_load", "training", "scaling"}
PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _load_synthetic():
    spec = importlib.util.spec_from_file_location("synthetic", HERE / "data" / "synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


syn = _load_synthetic()


@pytest.fixture(scope="module")
def records():
    return syn.report_records(seed=1)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, records):
    """The full synthetic fixture rendered once: (source file, Report, output dir)."""
    d = tmp_path_factory.mktemp("full")
    src = syn.write(d / "r.jsonl", records)
    return src, report.write(results.read([src]), d / "out", [str(src)]), d / "out"


def test_every_plot_type_renders_from_fixture_data(rendered):
    _src, rep, out = rendered
    assert {p.name for p in rep.plots} == ALL_PLOTS
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    for p in rep.plots:
        png = (out / "plots" / f"{p.name}.png").read_bytes()
        assert png[:8] == PNG and len(png) > 5_000
        assert f"](plots/{p.name}.png)" in md
    # self-contained: every plot embedded, nothing fetched from elsewhere
    assert html.count('src="data:image/png;base64,') == len(ALL_PLOTS)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # the memory plot draws the suite's budget; the env block names the machine
    assert "the dashed line is the suite's budget" in next(p for p in rep.plots if p.name == "memory").caption
    assert syn.SYNTHETIC_GPU in html and "0.0+synthetic" in md


def test_status_table_lists_every_non_ok_case_with_its_reason(rendered, records):
    src, _rep, out = rendered
    md = (out / "report.md").read_text()
    bad = [r for r in records if r["status"] != "ok"]
    assert {r["status"] for r in bad} == {"skipped", "mismatch", "oom", "timeout", "failed"}
    section = md.split("## Cases that did not run cleanly", 1)[1].split("\n## ", 1)[0]
    for r in bad:
        assert r["reason"].replace("|", "\\|") in section
    assert section.count(f"{src}:") == len(bad)  # each with the file:line of its record


def test_train_run_records_give_loss_and_maxvio_curves_and_a_table(rendered):
    _src, rep, out = rendered
    training = next(p for p in rep.plots if p.name == "training")
    assert "MaxVio per step" in training.caption
    md = (out / "report.md").read_text()
    assert "## Training runs" in md and "| bias |" in md


def test_scaling_finds_the_tokens_sweep_and_the_covarying_experts_sweep(records):
    df = report._groups(report.latest(report.frame(records)))
    sweeps = {(t.split(": ", 1)[1].split(" sweep")[0], len(s)) for t, _, s in report.find_sweeps(df)}
    assert ("tokens", 8) in sweeps           # 4 sizes x 2 backends
    assert any(axis == "n_experts" and n >= 4 for axis, n in sweeps)


def _only(records, pred):
    return [r for r in records if pred(r)]


def test_plots_without_data_are_omitted_and_old_pngs_removed(tmp_path, records, rendered):
    out = tmp_path / "out"
    shutil.copytree(rendered[2], out)  # a previous, full report in the same directory
    assert len(list((out / "plots").glob("*.png"))) == len(ALL_PLOTS)
    # one backend, no naive, no sweep, no loss curves, no balance block: only throughput/memory/tflops remain
    some = [json.loads(json.dumps(r)) for r in _only(records, lambda r: r["status"] == "ok"
                                                        and r["case"]["backend"] == "grouped_mm"
                                                        and r["suite"] == "synthetic-l4")]
    for r in some:
        for k in ("loss_curve", "balance"):
            r["metrics"].pop(k, None)
    part = syn.write(tmp_path / "part.jsonl", some)
    rep = report.write(results.read([part]), out, [str(part)])
    assert {p.name for p in rep.plots} == {"throughput", "memory", "tflops"}
    assert sorted(f.stem for f in (out / "plots").glob("*.png")) == sorted(["throughput", "memory", "tflops"])
    html = (out / "index.html").read_text()
    assert "Speed-up" not in html and "Training curves" not in html and "Cases that did not run" not in html


def test_only_failed_records_still_render_a_status_table(tmp_path, records):
    bad = syn.write(tmp_path / "bad.jsonl", _only(records, lambda r: r["status"] != "ok"))
    rep = report.write(results.read([bad]), tmp_path / "out", [str(bad)])
    assert rep.plots == [] or [p.name for p in rep.plots] == ["memory"]  # the oom record carries its peak
    assert "Cases that did not run cleanly" in (tmp_path / "out" / "report.md").read_text()


def test_claims_table_when_claims_module_and_seeds_suite_exist(tmp_path, records, monkeypatch):
    seeds = [json.loads(json.dumps(r)) for r in records[:3]]
    for r in seeds:
        r["suite"] = "seeds"
    seen = {}

    def claims_frame(df):
        seen["rows"] = len(df)
        return pd.DataFrame([{"seed": "MoEForge", "claim": "66% faster than naive", "claimed": 1.66, "unit": "x",
                              "claimed_device": "L4", "measured": 2.1, "measured_device": "H100",
                              "verdict": "not comparable", "why": "different GPU (synthetic test row)"}])

    monkeypatch.setitem(sys.modules, "moebench.claims", types.SimpleNamespace(claims_frame=claims_frame))
    src = syn.write(tmp_path / "seeds.jsonl", seeds)
    report.write(results.read([src]), tmp_path / "a", [str(src)])
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Seed claims" in md and "66% faster than naive" in md and seen["rows"] == 3
    other = syn.write(tmp_path / "other.jsonl", records[:3])  # no `seeds` suite: no section
    report.write(results.read([other]), tmp_path / "b", [str(other)])
    assert "Seed claims" not in (tmp_path / "b" / "report.md").read_text()


def test_claims_frame_error_is_shown_not_fatal(tmp_path, records, monkeypatch):
    def broken(df):
        raise KeyError("measured_device")

    monkeypatch.setitem(sys.modules, "moebench.claims", types.SimpleNamespace(claims_frame=broken))
    src = syn.write(tmp_path / "seeds.jsonl", [dict(r, suite="seeds") for r in records[:3]])
    report.write(results.read([src]), tmp_path / "a", [str(src)])
    assert "claims_frame failed: KeyError" in (tmp_path / "a" / "report.md").read_text()


def test_claims_section_omitted_when_module_missing(tmp_path, records, monkeypatch):
    monkeypatch.setitem(sys.modules, "moebench.claims", None)  # import raises ImportError
    seeds = [dict(r, suite="seeds") for r in records[:3]]
    src = syn.write(tmp_path / "seeds.jsonl", seeds)
    report.write(results.read([src]), tmp_path / "a", [str(src)])
    assert "Seed claims" not in (tmp_path / "a" / "report.md").read_text()


# ------------------------------------------------------------------------------------------- bad input
def _good_lines(records, n=3):
    return "".join(json.dumps(r) + "\n" for r in records[:n])


BAD = {
    "truncated": lambda good: good + '{"schema":1,"run_id":"x","case_key":"ab',
    "schema": lambda good: good + json.dumps({"schema": 99, "case_key": "k", "status": "ok"}) + "\n",
    "not_jsonl": lambda good: good + "case,backend,tokens_per_s\ntiny,naive,1000\n",
}
WHAT = {"truncated": "not a JSON record", "schema": "unknown schema version 99", "not_jsonl": "not a JSON record"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_lines_are_named_and_good_records_still_used(tmp_path, records, kind):
    p = tmp_path / f"{kind}.jsonl"
    p.write_text(BAD[kind](_good_lines(records)))
    res = runner.invoke(app, ["report", str(p), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert f"{p}:4" in res.output and WHAT[kind] in res.output
    assert "Traceback" not in res.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert "3 ok" in md and f"{p}:4" in md  # the problem is in the report too


@pytest.mark.parametrize("content, must_say", [
    ("", "empty file"),
    ("hello, this is not JSONL\nat all\n", "not a JSON record"),
    (json.dumps({"schema": 99, "case_key": "k", "status": "ok"}) + "\n", "unknown schema version 99"),
    ('{"schema":1,"case_key":"ab', "not a JSON record"),
])
def test_nothing_usable_exits_2_with_one_clear_message(tmp_path, content, must_say):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    res = runner.invoke(app, ["report", str(p), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    assert must_say in res.output and str(p) in res.output and "no usable records" in res.output
    assert not (tmp_path / "out").exists()


def test_missing_file_exits_2(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "cannot read" in res.output


def test_render_raises_clear_error_when_nothing_usable(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(report.NoUsableRecords, match="empty file"):
        report.render([p], tmp_path / "out")


@pytest.mark.slow
def test_run_renders_the_report_at_the_end(tmp_path, monkeypatch):
    suite = tmp_path / "one.toml"
    suite.write_text('backends = ["naive", "grouped_mm"]\n[[matrix]]\nmodels = [{ preset = "tiny-layer" }]\n'
                     '[[matrix.workloads]]\nbatch = 2\nseq = 16\nwarmup = 1\nrepeats = 3\n')
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "--suite", str(suite), "--out", "res/one.jsonl", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    html = tmp_path / "reports" / "one" / "index.html"
    assert html.exists(), res.output
    assert {f.stem for f in (tmp_path / "reports" / "one" / "plots").glob("*.png")} >= {"throughput", "speedup"}


def _paired_result():
    """A saved `moebench paired` result: one group, a base and a case 2x faster in every round."""
    def case(b, ms):
        return {"label": f"tiny | {b} | layer/train float32 2x16 uniform", "backend": b, "status": "ok",
                "samples_ms": [[ms, ms]] * 3, "step_ms_p50": ms, "tokens_per_s_p50": 32 / ms * 1e3,
                "tflops": 1e-3}
    from moebench import paired
    res = {"kind": paired.KIND, "schema": paired.SCHEMA, "rounds": 3, "steps": 2, "base_backend": "naive",
           "env": {"cpu": "test-cpu", "git_commit": "abc1234"},
           "groups": [{"group": "tiny | layer/train float32 2x16 uniform | cpu", "base": "",
                       "cases": [case("naive", 10.0), case("shuffle", 5.0)]}]}
    return paired.rebase(res, "naive")  # the ratios as a run writes them


def test_paired_results_join_the_report_as_plot_and_table(tmp_path, records):
    src = syn.write(tmp_path / "r.jsonl", records)
    pj = tmp_path / "paired-ab.json"
    pj.write_text(json.dumps(_paired_result()))
    res = runner.invoke(app, ["report", str(src), "-p", str(pj), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert str(pj) in md.splitlines()[2]  # listed among the inputs
    assert "## Paired: ab" in md and "](plots/paired-ab.png)" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny / layer/train") and "shuffle" in line)
    assert "| 2.000x |" in row and "commit abc1234" in md
    assert (tmp_path / "out" / "plots" / "paired-ab.png").read_bytes()[:8] == PNG
    html = (tmp_path / "out" / "index.html").read_text()
    assert "Paired: ab" in html
    # the env table stays last
    assert md.rindex("## Paired: ab") < md.rindex("## Environment of each run")


def test_a_bad_paired_file_exits_2_naming_it(tmp_path, records):
    src = syn.write(tmp_path / "r.jsonl", records)
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "something-else"}))
    res = runner.invoke(app, ["report", str(src), "-p", str(bad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and str(bad) in res.output and "not a `moebench paired` result" in res.output
    assert not (tmp_path / "out").exists()
