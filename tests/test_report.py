"""`moebench report`: every section and plot type renders from (SYNTHETIC, tests/data/synthetic.py) data, plots
without data are omitted (no empty figures; a section whose data is missing says why), no figure is a strip,
noisy records are marked, MFU comes from each record's own ceiling, every non-ok case is listed with its reason,
and bad input is a clear message naming file and line, with the good records still used and exit 2 only when
nothing usable remains."""
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
SECTIONS = ["throughput", "memory", "exec", "roofline", "phases", "balance", "training", "scaling", "tables"]
PLOT_STEMS = {"throughput", "memory", "exec-modes", "roofline", "phases", "balance", "expert_load", "training",
              "scaling"}
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


def _stem(name: str) -> str:
    """throughput-layer-train-eager-2 -> throughput, expert_load-2 -> expert_load, exec-modes -> exec-modes."""
    for stem in sorted(PLOT_STEMS, key=len, reverse=True):
        if name == stem or name.startswith(stem + "-"):
            return stem
    return name


def test_every_section_and_plot_type_renders_from_fixture_data(rendered):
    _src, rep, out = rendered
    assert [s.id for s in rep.sections] == SECTIONS
    assert {_stem(p.name) for p in rep.plots} == PLOT_STEMS
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    for p in rep.plots:
        png = (out / "plots" / f"{p.name}.png").read_bytes()
        assert png[:8] == PNG and len(png) > 5_000
        assert f"](plots/{p.name}.png)" in md
    for s in rep.sections:
        assert f'<section id="{s.id}">' in html and f"## {s.title}" in md
    # self-contained: every plot embedded, nothing fetched from elsewhere
    assert html.count('src="data:image/png;base64,') == len(rep.plots)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert syn.SYNTHETIC_GPU in html and "0.0+synthetic" in md


def test_no_figure_is_a_strip(rendered):
    """Every figure reads at 100% zoom: never more than 1.5x taller than wide (small multiples are split)."""
    _src, rep, _out = rendered
    for p in rep.plots:
        w, h = p.size
        assert h <= 1.5 * w, (p.name, w, h)


def test_small_multiples_split_into_figures_that_keep_their_aspect():
    from moebench import multiples
    from moebench.multiples import Bar, Panel

    few = [Panel(f"case {i}", [Bar("a", 1.0, "red"), Bar("b", 2.0, "blue")]) for i in range(30)]
    figs = multiples.layout(few)
    assert [len(f) for f in figs] == [12, 12, 6]   # 3 across, 4 rows at most
    tall = [Panel(f"case {i}", [Bar(str(j), 1.0, "red") for j in range(14)]) for i in range(9)]
    assert max(len(f) for f in multiples.layout(tall)) < 12   # tall panels: fewer rows per figure
    for group in multiples.layout(tall):
        fig = multiples.figure(group, "tokens/s", "t")
        w, h = fig.get_size_inches()
        assert h <= 1.5 * w


def test_throughput_panels_mark_the_base_print_speedups_and_flag_noisy_bars(records):
    from moebench import report_perf

    cur = report._groups(report.latest(report.frame(records)))
    small = cur[(cur["model"] == "moeforge-small") & (cur["status"] == "ok") & (cur["routing"] == "learned")]
    panel = report_perf._tps_panel(small)
    by = {b.label: b for b in panel.bars}
    assert by["naive"].base and by["naive"].note == "base"
    naive_tps = float(small.loc[small["backend"] == "naive", "tokens_per_s"].iloc[0])
    gmm_tps = float(small.loc[small["backend"] == "grouped_mm", "tokens_per_s"].iloc[0])
    assert by["naive"].flagged == "noisy" and by["grouped_mm"].flagged == ""   # the fixture's naive is noisy
    # so a ratio against it says so, though grouped_mm's own record is not noisy
    assert by["grouped_mm"].note == f"{gmm_tps / naive_tps:.2f}x (noisy)" and not by["grouped_mm"].base
    # whiskers: the record's 95% CI of the median, in tokens/s
    assert by["grouped_mm"].lo < gmm_tps < by["grouped_mm"].hi
    # no naive: grouped_mm is the base
    assert report_perf.base_of(["triton", "grouped_mm"]) == "grouped_mm" and report_perf.base_of(["triton"]) is None


def test_noisy_records_are_marked_in_the_tables_with_their_reason(rendered, records):
    _src, _rep, out = rendered
    md = (out / "report.md").read_text()
    results_part = md.split("### Results (ok cases)", 1)[1].split("\n### ", 1)[0]
    noisy = [r for r in records if r["status"] == "ok" and r["metrics"].get("noisy")]
    assert noisy
    for r in noisy:
        assert "noisy: " + r["metrics"]["noisy"].split(";")[0] in results_part
    rows = [line for line in results_part.splitlines() if line.startswith("| moeforge-small | model/train")]
    naive = next(line for line in rows if "| naive |" in line)
    assert " noisy |" in naive.split("| naive |", 1)[1].split("|")[0] + "|"   # the tokens/s cell says so
    assert "class=\"noisy\"" in (out / "index.html").read_text()


def test_mfu_uses_the_ceiling_stored_in_each_record_not_mfu_measured(tmp_path, records):
    one = json.loads(json.dumps(next(r for r in records if r["status"] == "ok" and r["case"]["backend"] == "shuffle")))
    one["metrics"]["mfu_measured"] = 0.999          # as if computed against another ceiling (issue 17.1)
    one["env"]["ceiling_tflops"] = 400.0
    one["env"]["gpu"] = "SYNTHETIC H200 (test fixture)"  # a name metrics.datasheet_peak knows: 989.4
    src = syn.write(tmp_path / "one.jsonl", [one])
    rep = report.write(results.read([src]), tmp_path / "out", [str(src)])
    t = next(t for t in rep.tables if t.title == "Results (ok cases)")
    row = dict(zip(t.columns, t.rows[0]))
    assert row["% of measured ceiling (MFU)"] == f"{one['metrics']['tflops'] / 400.0:.1%}"
    assert row["% of datasheet"] == f"{one['metrics']['tflops'] / 989.4:.1%}"
    assert "99.9%" not in t.rows[0] and "not the record's metrics.mfu_measured" in t.note


def test_exec_modes_side_by_side(rendered, records):
    _src, rep, _out = rendered
    sec = next(s for s in rep.sections if s.id == "exec")
    t = next(t for t in sec.tables if t.title == "Eager vs other execution modes")
    assert t.columns[3:] == ["eager tok/s ±95% CI", "graphs tok/s ±95% CI", "graphs/eager"]
    assert all(" ±" in row[3] and " ±" in row[4] for row in t.rows)
    assert len(t.rows) == 4  # the four grouped_mm layer sizes ran in both modes; naive never under graphs
    wl = [(r["case"]["workload"], r) for r in records if r["status"] == "ok"
          and r["case"]["model"]["name"] == "syn-layer" and r["case"]["backend"] == "grouped_mm"]
    tps = {(w["seq"], w.get("exec", "eager")): r["metrics"]["tokens_per_s"]["p50"] for w, r in wl}
    for row in t.rows:
        T = int(row[1].split(" ")[2].split("x")[1])
        assert row[-1].startswith(f"{tps[(T, 'graphs')] / tps[(T, 'eager')]:.2f}x")
    noise = next(t for t in sec.tables if t.title == "Noisy records per execution mode")
    assert [r[0] for r in noise.rows] == ["eager", "graphs"]


def test_roofline_places_layer_cases_and_skips_records_without_copy_bandwidth(tmp_path, records, rendered):
    _src, rep, _out = rendered
    sec = next(s for s in rep.sections if s.id == "roofline")
    t = sec.tables[0]
    layer_ok = [r for r in records if r["status"] == "ok" and r["case"]["workload"]["level"] == "layer"]
    assert len(t.rows) == len(layer_ok) and [p.name for p in sec.plots] == ["roofline-1"]
    row = dict(zip(t.columns, t.rows[0]))
    assert set(row) >= {"FLOP/B", "% of roof", "% of measured ceiling", "% of datasheet"}
    old = [json.loads(json.dumps(r)) for r in layer_ok]
    for r in old:
        r["env"].pop("copy_gbps")
    src = syn.write(tmp_path / "old.jsonl", old)
    rep = report.write(results.read([src]), tmp_path / "out", [str(src)])
    sec = next(s for s in rep.sections if s.id == "roofline")
    assert sec.plots == [] and sec.tables == []
    assert any(f"{len(old)} ok layer record(s) have no env.copy_gbps" in x for x in sec.text)


def test_phase_plot_when_profiles_exist_and_a_note_when_none_does(tmp_path, records, rendered):
    from moebench.report_phases import NO_PROFILE

    _src, rep, _out = rendered
    sec = next(s for s in rep.sections if s.id == "phases")
    assert [p.name for p in sec.plots] == ["phases-1"]
    t = sec.tables[0]
    assert [r[1] for r in t.rows] == ["naive", "grouped_mm"] and "idle gaps" in t.columns
    bare = [json.loads(json.dumps(r)) for r in records if r["suite"] == "synthetic-scaling"]
    for r in bare:
        r["metrics"].pop("profile", None)
    src = syn.write(tmp_path / "bare.jsonl", bare)
    rep = report.write(results.read([src]), tmp_path / "out", [str(src)])
    sec = next(s for s in rep.sections if s.id == "phases")
    assert sec.plots == [] and sec.text == [NO_PROFILE]
    assert "no phase split is drawn" in (tmp_path / "out" / "report.md").read_text()


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
    assert ("tokens", 4) in sweeps           # grouped_mm under graphs: its own sweep, never mixed with eager
    assert all(s["exec"].nunique() == 1 for _, _, s in report.find_sweeps(df))
    assert any(axis == "n_experts" and n >= 4 for axis, n in sweeps)


def _only(records, pred):
    return [r for r in records if pred(r)]


def test_plots_without_data_are_omitted_and_old_pngs_removed(tmp_path, records, rendered):
    out = tmp_path / "out"
    shutil.copytree(rendered[2], out)  # a previous, full report in the same directory
    assert len(list((out / "plots").glob("*.png"))) == len(rendered[1].plots)
    # one backend, model level, no sweep, no loss curves, no balance block, no profile: throughput and memory only
    some = [json.loads(json.dumps(r)) for r in _only(records, lambda r: r["status"] == "ok"
                                                        and r["case"]["backend"] == "grouped_mm"
                                                        and r["suite"] == "synthetic-l4")]
    for r in some:
        for k in ("loss_curve", "balance"):
            r["metrics"].pop(k, None)
    part = syn.write(tmp_path / "part.jsonl", some)
    rep = report.write(results.read([part]), out, [str(part)])
    assert {_stem(p.name) for p in rep.plots} == {"throughput", "memory"}
    assert [s.id for s in rep.sections] == ["throughput", "memory", "exec", "phases", "tables"]
    assert sorted(f.stem for f in (out / "plots").glob("*.png")) == sorted(p.name for p in rep.plots)
    html = (out / "index.html").read_text()
    assert "Roofline" not in html and "Training curves" not in html and "Cases that did not run" not in html


def test_only_failed_records_still_render_a_status_table(tmp_path, records):
    bad = syn.write(tmp_path / "bad.jsonl", _only(records, lambda r: r["status"] != "ok"))
    rep = report.write(results.read([bad]), tmp_path / "out", [str(bad)])
    assert [_stem(p.name) for p in rep.plots] == ["memory"]  # the oom record carries its peak
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
    assert "| exec |" not in md.split("## Seed claims")[1]  # a claims_frame without exec: its own columns only
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
    suite.write_text('backends = ["naive", "grouped_mm"]\nmax_time_s = 0.3\n[[matrix]]\n'
                     'models = [{ preset = "tiny-layer" }]\n[[matrix.workloads]]\nbatch = 2\nseq = 16\nwarmup = 1\n'
                     'repeats = 3\n')
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "--suite", str(suite), "--out", "res/one.jsonl", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    html = tmp_path / "res" / "one-report" / "index.html"  # beside the results file (--out's folder)
    assert html.exists(), res.output
    stems = {_stem(f.stem) for f in (html.parent / "plots").glob("*.png")}
    assert stems >= {"throughput", "memory"}, stems


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
    assert "### Paired: ab" in md and "](plots/paired-ab.png)" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny / layer/train") and "shuffle" in line)
    assert "| 2.000x |" in row and "commit abc1234" in md
    assert (tmp_path / "out" / "plots" / "paired-ab.png").read_bytes()[:8] == PNG
    html = (tmp_path / "out" / "index.html").read_text()
    assert "Paired: ab" in html
    # the env table stays last
    assert md.rindex("### Paired: ab") < md.rindex("### Environment of each run")


def test_a_bad_paired_file_exits_2_naming_it(tmp_path, records):
    src = syn.write(tmp_path / "r.jsonl", records)
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "something-else"}))
    res = runner.invoke(app, ["report", str(src), "-p", str(bad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and str(bad) in res.output and "not a `moebench paired` result" in res.output
    assert not (tmp_path / "out").exists()


def test_a_multi_rank_record_has_its_own_row_interval_and_mfu(records):
    """An EP record's tokens/s and TFLOP/s count every rank (core.timing_metrics): its interval (report and
    compare) must contain its median, its MFU is against R ceilings, and 1 and 2 ranks of one case are two rows."""
    import copy

    from moebench import compare
    one = next(r for r in records if r["status"] == "ok" and r["case"]["workload"]["level"] == "layer"
               and (r["metrics"].get("precision") or {}).get("ci95_ms") and r["env"].get("ceiling_tflops"))
    one = copy.deepcopy(one)
    one["case"]["workload"]["ranks"] = 1
    two = copy.deepcopy(one)
    two["case"]["workload"]["ranks"] = 2
    two["case_key"] += "-r2"
    for k in ("p20", "p50", "p80"):
        two["metrics"]["tokens_per_s"][k] *= 2  # two ranks, the same step time
    two["metrics"]["tflops"] *= 2
    df = report.latest(report.frame([one, two]))
    assert len(df) == 2 and df["workload"].nunique() == 2
    r1, r2 = df.iloc[0], df.iloc[1]
    assert r2["tps_lo"] <= r2["tokens_per_s"] <= r2["tps_hi"] and r2["tps_lo"] == pytest.approx(2 * r1["tps_lo"])
    assert r2["mfu_env"] == pytest.approx(r1["mfu_env"])
    ci, _ = compare.interval(results.to_frame([two]).iloc[0])
    assert ci[0] <= two["metrics"]["tokens_per_s"]["p50"] <= ci[1]


def test_an_fp8_record_gets_no_bf16_mfu_or_roofline(records):
    import copy
    rec = copy.deepcopy(next(r for r in records if r["status"] == "ok" and r["case"]["workload"]["level"] == "layer"
                             and r["env"].get("ceiling_tflops")))
    assert report.frame([rec]).iloc[0]["mfu_env"] is not None
    rec["case"]["workload"]["gemm_dtype"] = "fp8-rowwise"
    row = report.frame([rec]).iloc[0]
    assert row["mfu_env"] is None and row["mfu_sheet"] is None and row["roofline"] is None
