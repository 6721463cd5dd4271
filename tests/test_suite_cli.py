"""Suites load, validate and expand; bad input is one clear message and exit code 2; `moebench run --suite ci`
writes one ok record per (model, backend, workload), each with its env block."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.suite import SuiteError, available_suites, load

runner = CliRunner()


def test_every_shipped_suite_loads():
    for name in available_suites():
        for dev in ("cpu", "cuda"):
            cases = load(name, device=dev)
            assert cases, name
            assert len({c.key for c in cases}) == len(cases)


def test_ci_suite_covers_levels_routings_backends():
    cases = load("ci")
    assert {c.workload.level for c in cases} >= {"layer", "model"}
    assert len({c.workload.routing for c in cases}) >= 2
    assert {"naive", "shuffle", "grouped_mm"} <= {c.backend for c in cases}


def write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return str(p)


GOOD = """
[[matrix]]
models = [{ preset = "tiny-layer" }]
[[matrix.workloads]]
seq = 8
"""


@pytest.mark.parametrize("text, must_say", [
    ("[[matrix]]\nmodels = [{ preset = 'tiny-layr' }]\nworkloads = [{ seq = 8 }]\n",
     ["matrix[0].models[0].preset", "Did you mean 'tiny-layer'"]),
    (GOOD.replace("seq = 8", "seq = -8"), ["matrix[0].workloads[0].seq", "greater than or equal to 1"]),
    (GOOD.replace("seq = 8", "seq = 8\nroutng = 'uniform'"), ["routng", "Extra inputs"]),
    (GOOD.replace("{ preset = \"tiny-layer\" }", "{ preset = \"tiny-layer\", top_k = 9 }"), ["top_k (9)"]),
    (GOOD.replace("{ preset = \"tiny-layer\" }", "{ preset = \"tiny-layer\", router = { n_group = 4 } }"),
     ["n_group (4) must divide n_experts (6)"]),
    ("backends = ['naiv']\n" + GOOD, ["backends[0]", "Did you mean 'naive'"]),
    (GOOD + "[[matrix]\n", ["not valid TOML"]),
])
def test_bad_suite_is_one_clear_message(tmp_path, text, must_say):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(path)
    for s in must_say:
        assert s in msg, msg
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["run", "--suite", path, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2 and not out.exists()


def test_unknown_names_exit_2_with_closest_match(tmp_path):
    res = runner.invoke(app, ["run", "--suite", "c1", "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 2 and "Did you mean 'ci'" in res.output
    res = runner.invoke(app, ["run", "--suite", "ci", "--backends", "grouped-mm", "--device", "cpu",
                              "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 2 and "grouped_mm" in res.output
    assert not (tmp_path / "r.jsonl").exists()


def test_list_runs():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for word in ("naive", "grouped_mm", "ci", "l4", "moeforge-medium"):
        assert word in res.output


@pytest.mark.slow
def test_run_ci_suite_end_to_end(tmp_path):
    out = tmp_path / "ci.jsonl"
    proc = subprocess.run([sys.executable, "-m", "moebench", "run", "--suite", "ci", "--device", "cpu",
                           "--out", str(out), "--no-report"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    expected = load("ci")
    assert {r["case_key"] for r in recs} == {c.key for c in expected}
    bad = [(r["label"], r["status"], r["reason"]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
    for r in recs:
        assert r["env"]["torch"] and r["env"]["ceiling_tflops"] > 0
        assert r["metrics"]["tokens_per_s"]["p50"] > 0
