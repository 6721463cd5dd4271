"""`moebench compare`: a planted 10% tokens/s regression (fresh noisy samples) exits 1, a rerun of the same
distribution exits 0; a change counts only beyond the threshold AND when the two medians' 95% intervals do not
overlap; a noisy record gives `noise`, never `regression`; directions are right for each metric; --baseline
compares backends within one run; bad input exits 2."""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moebench import compare, metrics
from moebench.cli import app
from moebench.spec import preset

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("synthetic", HERE / "data" / "synthetic.py")
syn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(syn)
runner = CliRunner()

BACKENDS = {"naive": 40_000.0, "shuffle": 60_000.0, "grouped_mm": 90_000.0}


def fresh_seed() -> int:
    return secrets.randbits(32)  # fresh samples every run; the seed is in every assertion message


def run(seed: int, *, scale: dict | None = None, noise: float = 0.03, n: int = 400, peak: dict | None = None,
        env: dict | None = None) -> list[dict]:
    """One synthetic run: two models x three backends, each tokens/s times scale[backend]."""
    rng = np.random.default_rng(seed)
    recs = []
    for model in (preset("tiny"), preset("moeforge-small")):
        for b, tps in BACKENDS.items():
            c = syn.case(model, b, batch=2, seq=64, repeats=n)
            recs.append(syn.ok(c, rng, tps * (scale or {}).get(b, 1.0), noise=noise, n=n,
                               peak_gib=(peak or {}).get(b, 2.0), skew=0.3, env=env))
    return recs


def cli(tmp_path, *runs_, args=()):
    paths = [str(syn.write(tmp_path / f"run{i}.jsonl", r)) for i, r in enumerate(runs_)]
    return runner.invoke(app, ["compare", *paths, *args])


def as_json(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_planted_10pct_tokens_per_s_regression_exits_1(tmp_path):
    seed = fresh_seed()
    base, new = run(seed), run(seed + 1, scale={"grouped_mm": 0.9})
    res = cli(tmp_path, base, new, args=["--format", "json"])
    assert res.exit_code == 1, f"seed {seed}: {res.output}"
    out = as_json(res)
    reg = [r for r in out["rows"] if r["verdict"] == "regression"]
    assert {(r["backend"], r["metric"]) for r in reg} == {("grouped_mm", "tokens/s")}, f"seed {seed}"
    assert len(reg) == 2 and all(-0.16 < r["change"] < -0.04 for r in reg), f"seed {seed}: {reg}"
    assert all(r["new_ci"][1] < r["base_ci"][0] for r in reg), f"seed {seed}: {reg}"  # disjoint, new below


def test_rerun_of_the_same_distribution_exits_0(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1), args=["--format", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    assert as_json(res)["regressions"] == 0


def test_table_output_names_the_regression(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1, scale={"shuffle": 0.8}))
    assert res.exit_code == 1, f"seed {seed}: {res.output}"
    assert "regression" in res.stdout and "shuffle" in res.stdout and "2 regression(s)" in res.stdout


def test_beyond_threshold_but_too_few_samples_is_noise_not_regression(tmp_path):
    # 4 samples a side: 4 blocks, too few for a 95% interval of the median: the records are noisy, nothing decides
    seed = fresh_seed()
    res = cli(tmp_path, run(seed, n=4), run(seed + 1, n=4, scale={"grouped_mm": 0.7}), args=["-f", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    rows = [r for r in as_json(res)["rows"] if r["backend"] == "grouped_mm" and r["metric"] == "tokens/s"]
    assert rows and all(r["verdict"] == "noise" and r["change"] < -0.2 for r in rows), f"seed {seed}: {rows}"


def test_significant_but_within_threshold_is_not_a_regression(tmp_path):
    seed = fresh_seed()  # 2% slower with 0.2% noise: certainly significant, but under the 5% threshold
    res = cli(tmp_path, run(seed, noise=0.002), run(seed + 1, noise=0.002, scale={"naive": 0.98}), args=["-f", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    rows = [r for r in as_json(res)["rows"] if r["backend"] == "naive" and r["metric"] == "tokens/s"]
    assert rows and all(r["verdict"] == "same" and "moebench paired" in r["why"] for r in rows), f"seed {seed}: {rows}"
    # ... and with --threshold 0.01 the same data is a regression
    res = cli(tmp_path, run(seed, noise=0.002), run(seed + 1, noise=0.002, scale={"naive": 0.98}),
              args=["-f", "json", "--threshold", "0.01"])
    assert res.exit_code == 1, f"seed {seed}: {res.output}"


def test_a_noisy_record_is_noise_never_a_regression(tmp_path):
    seed = fresh_seed()  # 25% slower, but the new run's steps spread ~30%: flagged noisy, so it cannot decide
    res = cli(tmp_path, run(seed), run(seed + 1, noise=0.2, scale={"shuffle": 0.75}), args=["-f", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    rows = [r for r in as_json(res)["rows"] if r["backend"] == "shuffle" and r["metric"] == "tokens/s"]
    assert rows and all(r["verdict"] == "noise" and "new: " in r["why"] and "spread" in r["why"] and "--max-time" in r["why"]
                        for r in rows), f"seed {seed}: {rows}"


def test_overlapping_intervals_are_noise_and_say_what_would_decide(tmp_path):
    seed = fresh_seed()
    base, new = run(seed), run(seed + 1, scale={"grouped_mm": 0.9})
    for r in new:  # the same medians, but an interval this run could not narrow: they overlap the base's
        if r["case"]["backend"] == "grouped_mm":
            p = r["metrics"]["precision"]
            p["ci95_ms"] = [p["ci95_ms"][0] * 0.8, p["ci95_ms"][1]]
    res = cli(tmp_path, base, new, args=["-f", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    rows = [r for r in as_json(res)["rows"] if r["backend"] == "grouped_mm" and r["metric"] == "tokens/s"]
    assert rows and all(r["verdict"] == "noise" and "intervals overlap" in r["why"] for r in rows), rows


def test_only_changes_hides_same_rows(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1, scale={"grouped_mm": 0.85}), args=["-f", "json", "--only-changes"])
    rows = as_json(res)["rows"]
    assert res.exit_code == 1 and rows and all(r["verdict"] != "same" for r in rows), rows


def test_directions_faster_is_improvement_more_memory_is_regression(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1, scale={"naive": 1.3}, peak={"shuffle": 2.5, "grouped_mm": 1.5}),
              args=["-f", "json"])
    assert res.exit_code == 1, f"seed {seed}: {res.output}"
    v = {(r["backend"], r["metric"]): r["verdict"] for r in as_json(res)["rows"]}
    assert v[("naive", "tokens/s")] == "improvement"
    assert v[("shuffle", "peak GiB")] == "regression"
    assert v[("grouped_mm", "peak GiB")] == "improvement"


def test_a_cpu_peak_rss_is_not_judged_and_a_warning_says_why(tmp_path):
    """A CPU record's peak is its worker's RSS high-water mark: it moved 5% between two runs of the same sleeper case
    in results/cpu/planted-regression (first written there as an `improvement`). The same move of a CUDA allocator
    peak stays a regression."""
    seed = fresh_seed()
    base, new = run(seed), run(seed + 1, peak={"shuffle": 2.5})
    for r in base + new:
        gib = r["metrics"].pop("memory")["peak_allocated_gib"]
        r["metrics"]["memory"] = {"peak_rss_gib": gib, "note": "peak RSS of the worker process"}
    res = cli(tmp_path, base, new, args=["-f", "json"])
    out = as_json(res)
    assert res.exit_code == 0 and not [r for r in out["rows"] if r["metric"] == "peak GiB"], f"seed {seed}: {res.output}"
    assert any("RSS high-water mark" in w for w in out["warnings"]), out["warnings"]
    res = cli(tmp_path, run(seed), run(seed + 1, peak={"shuffle": 2.5}), args=["-f", "json"])
    v = {(r["backend"], r["metric"]): r["verdict"] for r in as_json(res)["rows"]}
    assert v[("shuffle", "peak GiB")] == "regression", f"seed {seed}"


def test_maxvio_up_is_a_regression():
    seed = fresh_seed()
    base, new = run(seed), copy.deepcopy(run(seed))
    for r in new:
        r["metrics"]["balance"]["global"]["maxvio"] *= 1.5
    cmp = compare.compare_runs(base, new)
    assert {r["verdict"] for r in cmp.rows if r["metric"] == "MaxVio"} == {"regression"}
    assert {r["verdict"] for r in cmp.rows if r["metric"] == "tokens/s"} == {"same"}  # identical samples


def test_ok_to_failed_is_a_regression_and_failed_to_ok_is_not(tmp_path):
    seed = fresh_seed()
    base, new = run(seed), run(seed + 1)
    new[0] = syn.not_ok(syn.case(preset("tiny"), "naive", batch=2, seq=64, repeats=400), "failed", "RuntimeError: boom")
    res = cli(tmp_path, base, new, args=["-f", "json"])
    assert res.exit_code == 1
    row = next(r for r in as_json(res)["rows"] if r["metric"] == "status")
    assert row["verdict"] == "regression" and "boom" in row["why"]
    res = cli(tmp_path, new, base, args=["-f", "json"])
    assert res.exit_code == 0, res.output


def test_baseline_mode_compares_every_backend_against_one(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), args=["--baseline", "naive", "-f", "json"])
    out = as_json(res)
    rows = [r for r in out["rows"] if r["metric"] == "tokens/s"]
    assert {(r["backend"], r["against"]) for r in rows} == {("shuffle", "naive"), ("grouped_mm", "naive")}
    assert len(rows) == 4 and all(r["verdict"] == "improvement" for r in rows), f"seed {seed}: {rows}"
    assert res.exit_code == 0
    res = cli(tmp_path, run(seed), args=["--baseline", "grouped_mm", "-f", "json"])
    assert res.exit_code == 1  # the others are slower than grouped_mm


def test_environment_difference_is_warned(tmp_path):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1, env=syn.ENV | {"torch": "9.9", "gpu": "Other GPU"}))
    assert "environments differ: gpu" in res.output and "torch 0.0+synthetic (base) vs 9.9 (new)" in res.output


@pytest.mark.parametrize("fmt", ["md", "csv", "json"])
def test_formats(tmp_path, fmt):
    seed = fresh_seed()
    res = cli(tmp_path, run(seed), run(seed + 1, scale={"grouped_mm": 0.85}), args=["--format", fmt])
    assert res.exit_code == 1, f"seed {seed}: {res.output}"
    if fmt == "md":
        assert res.stdout.startswith("| case | backend | metric |") and "| regression |" in res.stdout
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(res.stdout)))
        assert {"case", "metric", "change", "base_ci", "new_ci", "verdict"} <= set(rows[0])
        assert any(r["verdict"] == "regression" for r in rows)
    else:
        assert as_json(res)["regressions"] == 2


def test_samples_and_quantiles_agree_with_metrics_rates():
    """The fixture's tokens/s come from metrics.rates over the samples, like a real record."""
    rec = run(fresh_seed())[0]
    m = rec["metrics"]
    assert m["tokens_per_s"]["p50"] == pytest.approx(128 / (np.median(m["step_ms"]["samples"]) / 1e3))
    assert m == m | metrics.rates(m["step_ms"]["samples"], 128, m["flops_per_token"], 600.0, 989.4)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_exits_2(tmp_path):
    seed = fresh_seed()
    good = str(syn.write(tmp_path / "good.jsonl", run(seed)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    other = str(syn.write(tmp_path / "other.jsonl", run(seed, n=5)))  # different repeats: no case_key in common
    cases = [
        ([good], "two results files"),
        ([good, good, "--baseline", "naive"], "two results files"),
        ([good, str(empty)], "empty file"),
        ([str(junk), good], "junk.jsonl:1: not a JSON record"),
        ([good, other], "no case in common"),
        ([good, "--baseline", "triton"], "baseline backend 'triton' is not in the run"),
        ([good, good, "--format", "xml"], "--format must be"),
        ([good, str(tmp_path / "missing.jsonl")], "cannot read"),
    ]
    for args, must_say in cases:
        res = runner.invoke(app, ["compare", *args])
        assert res.exit_code == 2, (args, res.output)
        assert must_say in res.output, (args, res.output)
        assert isinstance(res.exception, SystemExit), (args, res.exception)


def test_truncated_last_line_is_warned_and_the_rest_compared(tmp_path):
    seed = fresh_seed()
    base = syn.write(tmp_path / "base.jsonl", run(seed))
    new = syn.write(tmp_path / "new.jsonl", run(seed + 1))
    with open(new, "a") as f:
        f.write('{"schema":1,"case_key":"cut-he')
    res = runner.invoke(app, ["compare", str(base), str(new), "-f", "json"])
    assert res.exit_code == 0, f"seed {seed}: {res.output}"
    assert f"{new}:7: not a JSON record" in res.output
    assert len({r["case"] + r["backend"] for r in as_json(res)["rows"]}) == 6
