"""What a newcomer meets first: --version, plain help, and one clear exit-2 message for each way to hold the
command wrong (issue 17's papercuts); and MFU against the very ceiling the record stores (issue 17.1)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moebench import envinfo, harness
from moebench.cli import app
from moebench.spec import Case, Workload, preset
from tests.procs import gone, wait_for

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_version_and_plain_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("moebench 0.")
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "<bool>" not in res.output


def test_resume_needs_out(tmp_path):
    res = runner.invoke(app, ["run", "--suite", "ci", "--device", "cpu", "--resume"])
    assert res.exit_code == 2 and "--resume continues a results file: give it with --out FILE" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_exits_2_before_any_case(tmp_path):
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["run", "--suite", "ci", "--device", "cuda", "--out", str(out)])
    assert res.exit_code == 2 and "torch.cuda.is_available() is False" in res.output and not out.exists()


def test_an_option_in_backends_explains_the_option_syntax(tmp_path):
    res = runner.invoke(app, ["run", "--suite", "ci", "-b", "triton,recompute=7", "--device", "cpu",
                              "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 2 and "'recompute=7' is an option" in res.output and "suite file" in res.output
    assert "Did you mean" not in res.output


def test_bad_precision_and_max_time_exit_2(tmp_path):
    for args, says in ((["--precision", "5"], "--precision must be a fraction"),
                       (["--max-time", "0"], "--max-time must be > 0")):
        res = runner.invoke(app, ["run", "--suite", "ci", "--device", "cpu", *args])
        assert res.exit_code == 2 and says in res.output, res.output


def test_default_output_goes_to_the_ignored_runs_folder():
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    res = runner.invoke(app, ["run", "--help"])
    assert "runs/<suite>-<run id>.jsonl (runs/ is git-ignored)" in " ".join(res.output.split())


def test_mfu_uses_the_ceiling_the_record_stores():
    """The env block's ceiling and the one MFU divides by are one measurement (they were two: the cache was keyed
    by "cpu" in one place and torch.device("cpu") in the other)."""
    env = envinfo.collect("cpu")
    c = Case(model=preset("tiny-layer"), backend="grouped_mm", max_time_s=0.2,
             workload=Workload(level="layer", batch=2, seq=16, warmup=1, repeats=3))
    m = harness.run_case(c, "t", env)["metrics"]
    assert m["tflops"] / m["mfu_measured"] == pytest.approx(env["ceiling_tflops"], rel=1e-9)
    assert envinfo.ceiling(torch.device("cpu")) is envinfo.ceiling("cpu") is envinfo.ceiling()


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc (Linux) to find the worker")
def test_sigkill_of_the_runner_takes_its_worker_along(tmp_path, cli_env):
    """A SIGKILLed `moebench run` cannot clean up: its worker dies by the parent-death signal instead of running
    its case to the end."""
    suite = tmp_path / "hang.toml"
    suite.write_text('backends = [{ name = "fault-hang", pidfile = "%s" }]\ntimeout_s = 600\n[[matrix]]\n'
                     'models = [{ preset = "tiny-layer" }]\n[[matrix.workloads]]\nseq = 8\n' % (tmp_path / "pids"))
    proc = subprocess.Popen([sys.executable, "-m", "moebench", "run", "--suite", str(suite), "--device", "cpu",
                             "--out", str(tmp_path / "r.jsonl"), "--no-report"], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = tmp_path / "pids"
    started = []
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 120, "the hanging case to start")
        started = [int(p) for p in pids.read_text().split()]  # the worker, and the child it left hanging
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert gone(started[0], within_s=10), "the worker outlived its SIGKILLed runner"
    finally:  # nothing of this test outlives it, pass or fail (the hanging `sleep` outlives the worker)
        for pid in [proc.pid, *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
