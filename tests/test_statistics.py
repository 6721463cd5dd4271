"""Statistics that do not cry wolf: precision-driven repeats, noise flags, one timing process per device, and
`compare` across two real runs (20 back-to-back pairs of the same code exit 0; a planted 25% slow-down exits 1,
20 of 20), each run in worker processes of its own as `moebench run` does.

The runs time the test-only `sleeper` backend (tests/faultbackends.py): naive's function in a step of
$MOEBENCH_TEST_SLEEP_MS (it sleeps out what its compute left of that), so the step's time is known and a slow-down can be planted under the same case key. A
tiny real backend is not used here on purpose: on a 2-vCPU virtual machine its step time moves between processes by
up to ~30% while each run's own interval is ~1-2% wide (measured while writing this; compare warns about CPU
timings for that reason), so no statistic of one run can tell two runs apart there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moebench import compare, metrics, results, runner
from moebench.core import timing
from moebench.core.steps import Step
from moebench.devicelock import DeviceLock
from moebench.suite import load
from tests.procs import wait_for

ROOT = Path(__file__).resolve().parent.parent
PAIRS = 20
# timing statistics need the machine to themselves: under pytest-xdist the other workers load the same cores
serial = pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")),
                            reason="timing statistics need the machine to themselves; run without -n (CI does)")


# ------------------------------------------------------------------------------------------------ the interval
def test_median_interval_covers_the_median_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    for n in (6, 10, 30):
        hits = 0
        for _ in range(2000):
            x = rng.lognormal(0.0, 0.5, n)  # skewed, like step times; true median 1.0
            lo, hi = metrics.median_ci(x)
            hits += lo <= 1.0 <= hi
        assert hits / 2000 >= 0.94, (n, hits)
    assert metrics.median_ci([1, 2, 3, 4, 5]) is None  # five blocks cannot give a 95% interval


def _sleep_step(ms_of):
    """A CPU step that sleeps ms_of(i) milliseconds."""
    return Step(run=lambda i: time.sleep(ms_of(i) / 1e3), routes_of=lambda o: [], flops_per_token=1.0)


@serial
def test_a_steady_step_reaches_its_precision_before_the_budget():
    t = timing.time_precise(_sleep_step(lambda i: 2.0), torch.device("cpu"), first=0, est_s=0.002, min_steps=3,
                            precision=0.05, max_time_s=5.0)
    p = t.precision
    assert p["reached"] and p["halfwidth"] <= 0.05 and p["n_blocks"] >= timing.MIN_BLOCKS and p["time_s"] < 5
    assert p["ci95_ms"][0] <= np.median(t.step_ms) * 1.05 and p["ci95_ms"][1] >= np.median(t.step_ms) * 0.95


def test_a_wild_step_spends_its_budget_and_is_flagged_noisy():
    rng = np.random.default_rng(0)
    t = timing.time_precise(_sleep_step(lambda i: float(rng.choice([1.0, 3.0]))), torch.device("cpu"), first=0,
                            est_s=0.002, min_steps=3, precision=0.001, max_time_s=0.4)
    assert not t.precision["reached"] and t.precision["time_s"] >= 0.4
    why = metrics.noise(metrics.rates(t.step_ms, 1, 1.0, None, None), t.precision)
    assert why.startswith("precision 0.1% not reached: 95% CI of the median ±") and "spread" in why


def test_drift_from_the_first_to_the_last_third_is_flagged():
    ms = list(np.linspace(1.0, 1.3, 200))  # a machine that slows down 30% during the case
    p = timing.summarize(ms, 10, 0.5, 10.0, 1.0)
    assert "drift +" in metrics.noise(metrics.rates(ms, 1, 1.0, None, None), p)
    rng = np.random.default_rng(0)  # the same scatter without a trend: no drift
    flat = list(1.0 + 0.03 * rng.standard_normal(200))
    assert "drift" not in (metrics.noise(metrics.rates(flat, 1, 1.0, None, None),
                                         timing.summarize(flat, 10, 0.5, 10.0, 1.0)) or "")


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_process_timing_the_same_device_sees_the_lock(tmp_path, monkeypatch, fault_backends):
    monkeypatch.setenv("MOEBENCH_LOCK_DIR", str(tmp_path / "locks"))
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(backends='["sleeper"]'))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MOEBENCH_EXTRA_BACKENDS="tests.faultbackends",
               MOEBENCH_TEST_SLEEP_MS="5")
    with DeviceLock("cpu") as held:  # this test process is "the other moebench" timing the CPU
        assert held.busy is None
        out = tmp_path / "nowait.jsonl"
        proc = subprocess.run([sys.executable, "-m", "moebench", "run", "--suite", str(suite), "--device", "cpu",
                               "--out", str(out), "--no-report", "--no-wait"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rec = results.read(out).records[0]
        assert rec["status"] == "ok" and f"pid {os.getpid()}" in rec["metrics"]["noisy"], rec["metrics"]["noisy"]
        errfile, wait_out = tmp_path / "wait.err", tmp_path / "wait.jsonl"
        with open(errfile, "w") as err_w:
            waiting = subprocess.Popen([sys.executable, "-m", "moebench", "run", "--suite", str(suite), "--device",
                                        "cpu", "--out", str(wait_out), "--no-report"], env=env, stderr=err_w,
                                       stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: "waiting for cpu" in errfile.read_text() or waiting.poll() is not None, 120,
                     "the second run to say it waits for the lock")
            time.sleep(2)  # and it keeps waiting: no record while the lock is held
            assert waiting.poll() is None, errfile.read_text()[-2000:]
            assert not (wait_out.exists() and wait_out.read_text().strip())
        except BaseException:
            waiting.kill()
            raise
    waiting.wait(timeout=300)
    err = errfile.read_text()
    assert waiting.returncode == 0 and f"waiting for cpu: moebench pid {os.getpid()}" in err, err[-2000:]
    rec = results.read(tmp_path / "wait.jsonl").records[0]
    assert rec["status"] == "ok" and "device_busy" not in rec["metrics"]


# ------------------------------------------------------------------------------------------------ two real runs
SUITE = """max_time_s = 3.0
precision = 0.02
timeout_s = 120
backends = {backends}
[[matrix]]
models = [{{ preset = "tiny-layer" }}]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 2
seq = 16
warmup = 2
repeats = 10
"""


def _run(cases, path: Path) -> list[dict]:
    runner.run(cases, path, reuse_worker=True, progress=False, console=_quiet())
    return results.read(path).records


def _quiet():
    from rich.console import Console
    return Console(file=open(os.devnull, "w"), stderr=False)  # noqa: SIM115


@serial
def test_back_to_back_runs_compare_equal_and_a_planted_slowdown_is_a_regression(tmp_path, monkeypatch,
                                                                                  fault_backends):
    """20 rounds of three runs of the same suite, back to back, each in its own worker process: A and B the same
    code (compare must exit 0: no `regression`, no `improvement`), C with the step ~25% slower under the same case
    key (the sleeper's step is 25 ms instead of 20: compare A C must exit 1 with that one regression). 20 of 20
    each. What is under test is the measurement and `compare` (intervals, precision, noise flags, the rule), not
    the CPU: the sleeper sleeps out what its compute leaves of the step, so that compute does not move it."""
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(backends='["sleeper"]'))
    cases = load(str(suite), device="cpu")
    same = []
    for i in range(PAIRS):
        monkeypatch.setenv("MOEBENCH_TEST_SLEEP_MS", "20")
        a, b = _run(cases, tmp_path / f"a{i}.jsonl"), _run(cases, tmp_path / f"b{i}.jsonl")
        monkeypatch.setenv("MOEBENCH_TEST_SLEEP_MS", "25")
        c = _run(cases, tmp_path / f"c{i}.jsonl")
        ab, ac = compare.compare_runs(a, b), compare.compare_runs(a, c)
        tps = [next(r for r in x.rows if r["metric"] == "tokens/s") for x in (ab, ac)]
        why = [(i, r["verdict"], round(r["change"], 3), r["why"]) for r in tps]
        assert ab.regressions == 0 and ab.improvements == 0, why
        same.append(tps[0]["verdict"])
        reg = [r for r in ac.rows if r["verdict"] == "regression"]
        assert len(reg) == 1 and reg[0]["metric"] == "tokens/s" and -0.25 < reg[0]["change"] < -0.12, why
    assert same.count("same") >= PAIRS * 0.8, same  # the steady step is judged, not waved through as noise
    _compare_cli(*(str(tmp_path / f"{x}0.jsonl") for x in "abc"))


def _compare_cli(a: str, b: str, c: str) -> None:
    """The command's exit codes on the first round's files: 0 same code, 1 slower; --only-changes hides `same`."""
    from typer.testing import CliRunner

    from moebench.cli import app
    for flag in ([], ["--only-changes"]):
        res = CliRunner().invoke(app, ["compare", a, b, *flag])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(app, ["compare", a, c, *flag])
        assert res.exit_code == 1 and "regression" in res.output, res.output
    res = CliRunner().invoke(app, ["compare", a, c, "--only-changes", "--format", "json"])
    rows = json.loads(res.stdout[res.stdout.index("{"):])["rows"]
    assert rows and all(r["verdict"] != "same" for r in rows)
