"""Fault injection: a worker that dies, hangs or runs out of memory costs one case, never the run; the results
file is never corrupted; Ctrl-C loses no finished record and --resume completes the suite.

The misbehaving backends are in tests/faultbackends.py. Each test says which protection it checks, i.e. what
would have to break for it to fail. Tiny shapes; worker start (~3-5 s: torch import) dominates the time.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from rich.console import Console
from typer.testing import CliRunner

from moebench import results, runner
from moebench.cli import app
from moebench.suite import load
from tests.procs import gone, wait_for

pytestmark = pytest.mark.timeout(240)

HANG_TIMEOUT_S = 3
LAYER = 'level = "layer"\nmode = MODE\nbatch = 1\nseq = 8\nwarmup = 0\nrepeats = 2\n'


def suite_toml(backends: list, *, mode='"train"', timeout_s: float = 60) -> str:
    """A one-matrix suite on the tiny layer shape; backends are names or option dicts."""
    def entry(b):
        if isinstance(b, str):
            return json.dumps(b)
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in b.items()) + " }"
    return (f"timeout_s = {timeout_s}\nmax_time_s = 0.3\n[[matrix]]\nmodels = [{{ preset = \"tiny-layer\" }}]\n"
            f"backends = [{', '.join(entry(b) for b in backends)}]\n[[matrix.workloads]]\n"
            + LAYER.replace("MODE", mode))


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


# --------------------------------------------------------------- one suite, many faults, one worker reused
FAULT_SUITE = """timeout_s = 60
max_time_s = 0.3
[[matrix]]
models = [{ preset = "tiny-layer" }]
backends = ["naive", { name = "fault-hang", pidfile = PIDFILE }, "fault-kill", "shuffle", "fault-oom",
            "fault-cpu-oom", "fault-wrong", { name = "fault-nan", nan_from_call = 0 }, "fault-raise"]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 8
warmup = 0
repeats = 2

[[matrix]]
models = [{ preset = "tiny" }]
backends = [{ name = "fault-nan", nan_from_call = 5 }, "naive"]
[[matrix.workloads]]
level = "model"
mode = "train"
batch = 1
seq = 8
warmup = 1
repeats = 3
"""


class FaultRun:
    def __init__(self, cases, summary, out, pidfile, console):
        self.cases, self.summary, self.out, self.pidfile = cases, summary, out, pidfile
        self.console = console.file.getvalue()
        self.records = summary.records

    def get(self, backend: str, level: str = "layer") -> dict:
        [r] = [r for r in self.records
               if r["case"]["backend"] == backend and r["case"]["workload"]["level"] == level]
        return r


@pytest.fixture(scope="module")
def fault_run(fault_backends, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    pidfile = d / "hang.pids"
    suite = d / "faults.toml"
    suite.write_text(FAULT_SUITE.replace("PIDFILE", json.dumps(str(pidfile))))
    # the worker is warm when the hang case starts (naive ran first), so a short timeout is only the hang's
    cases = [c.model_copy(update={"timeout_s": HANG_TIMEOUT_S}) if c.backend == "fault-hang" else c
             for c in load(str(suite))]
    out = d / "faults.jsonl"
    console = Console(file=io.StringIO(), width=400)
    summary = runner.run(cases, out, reuse_worker=True, progress=False, console=console)
    return FaultRun(cases, summary, out, pidfile, console)


def test_every_case_has_one_record_on_disk(fault_run):
    loaded = results.read(fault_run.out)
    assert loaded.problems == []
    assert [r["case_key"] for r in loaded.records] == [c.key for c in fault_run.cases]
    assert not fault_run.summary.interrupted


def test_sigkilled_worker_costs_that_case_only(fault_run):
    # protection: the runner reads a dead worker's pipe as `failed` with the signal and starts a new worker
    r = fault_run.get("fault-kill")
    assert r["status"] == "failed" and "SIGKILL" in r["reason"], r["reason"]
    assert fault_run.get("shuffle")["status"] == "ok"  # the next case, in a fresh worker


def test_hang_is_a_timeout_and_the_process_tree_is_gone(fault_run):
    # protection: poll(timeout) + killpg of the worker's own session (a plain kill would leave the grandchild)
    r = fault_run.get("fault-hang")
    assert r["status"] == "timeout", r["reason"]
    assert f"{HANG_TIMEOUT_S}" in r["reason"]
    worker_pid, grandchild_pid = map(int, fault_run.pidfile.read_text().split())
    assert gone(worker_pid), f"worker {worker_pid} still running"
    assert gone(grandchild_pid), f"the worker's child {grandchild_pid} still running"
    assert fault_run.get("fault-kill")["status"] == "failed"  # the suite went on


def test_out_of_memory_is_oom_and_the_rest_run(fault_run):
    # protection: run_case's `except torch.OutOfMemoryError` (a generic handler would say `failed`)
    r = fault_run.get("fault-oom")
    assert r["status"] == "oom" and "out of memory" in r["reason"], r
    r = fault_run.get("fault-cpu-oom")  # the CPU allocator raises a plain RuntimeError; run_case recognises it
    assert r["status"] == "oom" and "can't allocate memory" in r["reason"], r
    assert fault_run.get("fault-wrong")["status"] == "mismatch"
    assert fault_run.get("naive", "model")["status"] == "ok"


def test_nonfinite_loss_fails_with_the_step(fault_run):
    # protection: measure() checks every timed loss and raises NonFiniteLoss(step); run_case records it
    r = fault_run.get("fault-nan", "model")
    m = r["case"]["model"]
    moe_layers = m["n_layers"] - m["first_dense_layers"]
    first_nan_step = (5 - 1) // moe_layers  # call 0 is the parity check; each step calls once per MoE layer
    assert r["status"] == "failed", r["reason"]  # warm-up losses are checked too (the NaN comes in step 2)
    assert r["metrics"]["failed_step"] == first_nan_step
    assert f"at step {first_nan_step}" in r["reason"] and "non-finite loss" in r["reason"]
    # (train-run workloads check every loss as they train: moebench/train.py)


def test_wrong_numbers_are_a_mismatch_and_never_timed(fault_run):
    # protection: parity vs naive runs before measure(), and a mismatch returns before any timing
    r = fault_run.get("fault-wrong")
    assert r["status"] == "mismatch" and "vs naive" in r["reason"], r["reason"]
    m = r["metrics"]
    assert "step_ms" not in m and "tokens_per_s" not in m
    assert 5e-4 < m["parity"]["errors"]["y"] < 2e-3  # the injected 1e-3, seen as such
    assert fault_run.get("naive")["status"] == "ok" and "step_ms" in fault_run.get("naive")["metrics"]


def test_nan_output_is_a_mismatch_and_its_record_is_valid_json(fault_run):
    # protection: inf/NaN in a record (here the parity errors) are stored as null, not as invalid JSON that
    # append() would refuse, which stopped the whole suite
    r = fault_run.get("fault-nan")
    assert r["status"] == "mismatch" and "rel err inf" in r["reason"], r["reason"]  # rel_err: NaN output -> inf
    [on_disk] = [x for x in results.read(fault_run.out).records if x["case_key"] == r["case_key"]]
    assert on_disk["metrics"]["parity"]["errors"]["y"] is None and "step_ms" not in on_disk["metrics"]


def test_an_exception_is_failed_with_its_message_shown_verbatim(fault_backends, fault_run):
    # protection: run_case's catch-all records the exception; the runner prints reasons as text, not markup
    # (a "[/]" in an exception message used to raise MarkupError in the runner and stop the suite)
    r = fault_run.get("fault-raise")
    assert r["status"] == "failed" and r["reason"] == f"ValueError: {fault_backends.RAISE_MESSAGE}"
    assert fault_backends.RAISE_MESSAGE in fault_run.console


# ------------------------------------------------------------------------------------------ Ctrl-C, resume
def interrupted_run(args, pidfile, sig, env, cwd) -> str:
    """Start `moebench run`, send `sig` once the hanging case has started (its pidfile exists); its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "moebench", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pidfile.exists() or proc.poll() is not None, 120, "the hanging case to start")
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)  # a loaded 2-core CI machine: 30 s timed out twice (one suspect: a slow exit)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr and "--resume" in stderr, stderr
    worker_pid, grandchild_pid = map(int, pidfile.read_text().split())
    # protection: on KeyboardInterrupt (and SIGTERM, turned into one) the runner kills the worker's whole
    # session; without it the hung worker and its child outlive the run (they are not in its process group)
    assert gone(worker_pid) and gone(grandchild_pid), f"{sig.name}: the interrupted case's worker tree survived"
    return stderr


def test_ctrl_c_or_sigterm_keep_finished_records_and_resume_completes(fault_backends, tmp_path, cli_env):
    p1, p2 = tmp_path / "hang1.pids", tmp_path / "hang2.pids"
    suite = tmp_path / "ctrlc.toml"
    # each fault-hang hangs the first time it runs (writing its pids), then behaves: a resumed run can finish
    suite.write_text(suite_toml(["naive", {"name": "fault-hang", "pidfile": str(p1)}, "shuffle",
                                 {"name": "fault-hang", "pidfile": str(p2)}], mode='["train", "forward"]'))
    out = tmp_path / "ctrlc.jsonl"
    args = ["run", "--suite", suite, "--out", out, "--worker", "reuse", "--no-report"]

    err = interrupted_run(args, p1, signal.SIGINT, cli_env, tmp_path)  # Ctrl-C in the 2nd case
    # the hint repeats every option given (--worker, --no-report, ...), with --out and --resume
    assert f"continue with: moebench run --suite {suite} --worker reuse --no-report --out {out} --resume" in err, err
    loaded = results.read(out)
    assert loaded.problems == []
    assert [(r["case"]["backend"], r["status"]) for r in loaded.records] == [("naive", "ok")]

    err = interrupted_run([*args, "--resume"], p2, signal.SIGTERM, cli_env, tmp_path)  # stopped in the 4th
    assert "1 already done (--resume)" in err
    loaded = results.read(out)
    assert loaded.problems == [] and len(loaded.records) == 3  # the first record untouched, two more

    res = cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "3 already done (--resume)" in res.stderr
    listed = cli("run", "--suite", suite, "--list-cases")
    # "<case_key>  <label>" per case; a long label (a long tmp path in it: pytest -n N adds popen-gwN/) wraps
    uninterrupted = set(re.findall(r"^([0-9a-f]{16})  ", listed.stdout, re.MULTILINE))
    final = results.read(out)
    assert final.problems == [] and final.records[:3] == loaded.records
    keys = [r["case_key"] for r in final.records]
    assert len(keys) == len(set(keys)) == 8 and set(keys) == uninterrupted
    assert {r["status"] for r in final.records} == {"ok"}


def test_resume_on_an_empty_results_file_has_nothing_to_warn_about(tmp_path):
    out = tmp_path / "empty.jsonl"
    out.write_text("")  # interrupted before the first case ended: check_writable had created the file
    assert results.done_keys(out) == (set(), [])


# --------------------------------------------------------------------------------- the results file itself
def test_two_runs_append_to_one_file_without_torn_lines(tmp_path, cli_env):
    suite = tmp_path / "two.toml"
    suite.write_text(suite_toml(["naive", "shuffle"], mode='["train", "forward"]'))
    out = tmp_path / "shared.jsonl"
    cmd = [sys.executable, "-m", "moebench", "run", "--suite", str(suite), "--out", str(out), "--worker", "reuse",
           "--no-report"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    recs = [json.loads(line) for line in raw.decode().splitlines()]  # a torn or interleaved line fails here
    by_run: dict[str, set] = {}
    for r in recs:
        by_run.setdefault(r["run_id"], set()).add(r["case_key"])
    assert len(recs) == 8 and len(by_run) == 2 and all(len(k) == 4 for k in by_run.values())


def test_append_waits_for_the_file_lock(tmp_path):
    # protection: append() takes an exclusive flock; writing while another writer holds it would interleave
    out = tmp_path / "locked.jsonl"
    out.write_text("")
    rec = {"schema": results.SCHEMA, "case_key": "k", "status": "ok", "pad": "x" * 10000}
    with open(out, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t = threading.Thread(target=results.append, args=(out, rec))
        t.start()
        t.join(0.5)
        assert t.is_alive() and out.read_text() == "", "append wrote while another writer held the lock"
        fcntl.flock(holder, fcntl.LOCK_UN)
    t.join(5)
    assert not t.is_alive() and json.loads(out.read_text()) == rec


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_unwritable_results_path_fails_before_any_case(tmp_path, monkeypatch, where):
    suite = tmp_path / "one.toml"
    suite.write_text(suite_toml(["naive"]))
    if where == "a directory":
        out = tmp_path / "out.jsonl"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.jsonl"

    def no_worker(*a, **k):
        raise AssertionError("a worker started although the results file cannot be written")

    monkeypatch.setattr(runner, "Worker", no_worker)
    res = cli("run", "--suite", suite, "--out", out, "--no-report")
    assert res.exit_code == 2, res.output
    assert not isinstance(res.exception, Exception), res.exception
    msg = " ".join(res.stderr.split())
    assert msg.startswith("error: cannot write results file") and str(out) in msg, msg


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system (Linux has one)")
def test_a_failed_append_names_the_results_file():
    # protection: append() turns an OSError of the write (here ENOSPC from /dev/full) into a ResultsPathError
    # whose message names the file; `moebench run` prints it and exits 2
    rec = {"schema": results.SCHEMA, "case_key": "k", "status": "ok"}
    with pytest.raises(results.ResultsPathError, match="cannot write results file /dev/full: No space left"):
        results.append("/dev/full", rec)


def test_corrupt_lines_warn_with_line_numbers_and_good_lines_are_kept(tmp_path):
    suite = tmp_path / "resume.toml"
    suite.write_text(suite_toml(["naive", "shuffle"], mode='["train", "forward"]'))
    cases = load(str(suite))
    rec = [json.dumps(results.make_record(c, "skipped", run_id="old", env={}, reason="written by the test"))
           for c in cases]
    # line 2: garbage; line 4: a record cut short by a crash mid-write (no newline after it)
    before = rec[0] + "\n" + '{"schema": 1, "case_ke\n' + rec[1] + "\n" + rec[2][:80]
    out = tmp_path / "resume.jsonl"
    out.write_text(before)
    res = cli("run", "--suite", suite, "--out", out, "--resume", "--worker", "reuse", "--no-report")
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert f"warning: {out}:2: not a JSON record" in err and f"warning: {out}:4: not a JSON record" in err, err
    assert "2 already done (--resume)" in err
    after = out.read_text()
    assert after.startswith(before)  # nothing rewritten or dropped
    loaded = results.read(out)
    assert [p.split(": ")[0] for p in loaded.problems] == [f"{out}:2", f"{out}:4"]
    keys = [r["case_key"] for r in loaded.records]
    # the good lines, then the two cases that were not done, each a whole record (not glued to the torn line)
    assert keys[:2] == [cases[0].key, cases[1].key] and sorted(keys[2:]) == sorted(c.key for c in cases[2:])


def test_strict_exits_1_on_a_mismatch_and_names_it_plain_run_exits_0(fault_backends, tmp_path):
    # protection: cli.run's `if strict and bad: raise typer.Exit(1)` (issue 17, item 7: parity gates CI). Without
    # --strict the same suite exits 0 (it ran to the end; the records say why each case ended as it did).
    suite = tmp_path / "wrong.toml"
    suite.write_text(suite_toml(["naive", "fault-wrong"], mode='"forward"'))
    for flags, code in ((["--strict"], 1), ([], 0)):
        out = tmp_path / f"wrong{len(flags)}.jsonl"
        res = cli("run", "--suite", suite, "--device", "cpu", "--out", out, "--no-report", "--worker", "reuse",
                  *flags)
        assert res.exit_code == code, res.output
        statuses = {r["case"]["backend"]: r["status"] for r in results.read(out).records}
        assert statuses == {"naive": "ok", "fault-wrong": "mismatch"}, statuses
        err = " ".join(res.stderr.split())
        assert ("--strict: 1 case(s) ended mismatch" in err and "fault-wrong" in err) == bool(flags), err
