"""Multi-node launch on one host (CPU, gloo): `moebench run --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`,
two launchers of one process each, give the same records as `--nproc 2` on one node, in everything but timing;
bad combinations of the options are exit 2 with one sentence naming the option.

The three launches run at once (each with its own lock directory, as separate machines would have): the two
"nodes" meet in torchrun's c10d rendezvous, the --nproc 2 run beside them.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from tests.test_ep import FAULTS

REPO = Path(__file__).resolve().parent.parent

SUITE = '''
description = "tiny expert-parallel suite for the multi-node test (tests/test_ep_nodes.py)"
timeout_s = 60
max_time_s = 0.1

[[matrix]]   # the first 2-rank case: rank 1 (node 1) raises; the others run in a new launch, both nodes following
models = [{ preset = "tiny-layer" }]
backends = ["ep-fault-fail"]
[[matrix.workloads]]
level = "layer"
seq = 16
dtype = "float32"
routing = "uniform"
ranks = 2
warmup = 1
repeats = 3

[[matrix]]
models = [{ preset = "tiny-layer" }]
backends = ["ep", "ep-padded", "ep-pipelined"]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 16
dtype = "float32"
routing = "uniform"
ranks = [1, 2]
warmup = 1
repeats = 3

[[matrix]]
models = [{ preset = "tiny-layer" }]
backends = ["grouped_mm"]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 16
dtype = "float32"
routing = "uniform"
warmup = 1
repeats = 3

[[matrix]]
models = [{ preset = "tiny-layer" }]
backends = ["ep"]
[[matrix.workloads]]
level = "layer"
seq = 16
dtype = "float32"
routing = "uniform"
ranks = 3
'''


@pytest.mark.parametrize("args, message", [
    (["--node-rank", "1"], "--node-rank: for a multi-node launch; give --nnodes N (N >= 2) as well"),
    (["--rdzv-endpoint", "h:1"], "--rdzv-endpoint: for a multi-node launch; give --nnodes N"),
    (["--nnodes", "2", "--node-rank", "0"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:29500"], "--nnodes 2 needs --node-rank R: 0 on the node that writes"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29500"],
     "--node-rank must be in 0..1 for --nnodes 2; got 2"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h"], "--rdzv-endpoint must be HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:99999"], "a port in 1..65535"),
])
def test_bad_node_options_exit_2(args, message, tmp_path):
    res = CliRunner().invoke(app, ["run", "--suite", "ep", "--device", "cpu", "--out", str(tmp_path / "r.jsonl"),
                                   *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "r.jsonl").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(150)
def test_two_nodes_give_the_records_of_nproc_2(tmp_path):
    (tmp_path / "s.toml").write_text(SUITE)
    (tmp_path / "ep_faults.py").write_text(FAULTS)
    env = dict(os.environ, OMP_NUM_THREADS="1",  # alike in both launches: the parity errors are compared exactly
               MOEBENCH_EXTRA_BACKENDS="ep_faults",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "moebench", "run", "--suite", str(tmp_path / "s.toml"), "--device", "cpu",
            "--no-report"]
    endpoint = f"127.0.0.1:{_free_port()}"
    runs = {
        "one": base + ["--nproc", "2", "--out", str(tmp_path / "one.jsonl")],
        "node0": base + ["--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", endpoint,
                         "--out", str(tmp_path / "two.jsonl")],
        "node1": base + ["--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", endpoint,
                         "--out", str(tmp_path / "node1.jsonl")],
    }
    procs = {k: subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env | {"MOEBENCH_LOCK_DIR": str(tmp_path / f"locks-{k}")})
             for k, cmd in runs.items()}
    outs = {k: p.communicate(timeout=140)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, f"{k}: {outs[k][-3000:]}"
    assert "the lead's plan is done" in outs["node1"]
    assert not (tmp_path / "node1.jsonl").exists()  # a follower records nothing
    one = [json.loads(ln) for ln in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(ln) for ln in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["case_key"] for r in one] == [r["case_key"] for r in two] and len(one) == 9
    assert "node 1 of 2: launch 2" in outs["node1"]  # node 1 followed the lead into its second launch
    for a, b in zip(one, two):
        assert a["status"] == b["status"], a["label"]
        if a["status"] == "failed":  # rank 1's own error (on node 1: through the rendezvous store), then rank 0's
            for r in (a, b):
                assert r["reason"].startswith("rank 1: RuntimeError: injected failure on rank 1"), r["reason"]
            continue
        if a["status"] == "skipped":  # ranks=3 on 2 processes; the reason names each launch's shape
            assert "needs 3 processes; this run has --nproc 2" in a["reason"]
            assert "needs 3 processes; this run has --nproc 1 on each of --nnodes 2 (2 in all)" in b["reason"]
            continue
        assert a["status"] == "ok", (a["label"], a["reason"])
        ma, mb = a["metrics"], b["metrics"]
        assert ma["parity"]["errors"] == mb["parity"]["errors"] and ma["parity"]["ok"]
        for k in ("global", "per_batch_mean", "per_layer"):
            assert _close(ma["balance"][k], mb["balance"][k]), (a["label"], k)
        assert b["env"]["ranks_launched"] == 2 and b["env"].get("nodes_launched") == 2
        assert "nodes_launched" not in a["env"]
        R = a["case"]["workload"].get("ranks") or 1
        if a["case"]["backend"] == "grouped_mm":  # a one-process case, run on rank 0 of the launch
            continue
        for pa, pb in zip(ma["ep"]["per_rank"], mb["ep"]["per_rank"]):
            for k in ("rank", "tokens", "rows_received", "rows_sent_remote", "rows_received_remote"):
                assert pa[k] == pb[k], (a["label"], k)
        assert ma["ep"]["ranks"] == mb["ep"]["ranks"] == R
        for k in ("bytes_by_kind", "a2a_bytes_per_step", "padding_frac"):
            assert ma["ep"][k] == mb["ep"][k], (a["label"], k)
        assert mb["exec"] == ma["exec"]
        padded = a["case"]["backend"] in ("ep-padded", "ep-pipelined")
        if R == 2:  # bytes on the wire, their rate, and ep-padded's padding (T*K = 32 slots in 2 x 32 rows)
            assert ma["ep"]["bytes_by_kind"]["dispatch"] > 0
            if a["case"]["backend"] == "ep-pipelined":  # only waits are timed: exposed time, no bandwidth
                assert "dispatch" not in ma["ep"]["gbps_by_kind"] and ma["ep"]["a2a_ms_by_kind"]["dispatch_wait"] > 0
            else:
                assert ma["ep"]["gbps_by_kind"]["dispatch"] > 0
            assert (0 < ma["ep"]["padding_frac"] < 1) if padded else ma["ep"]["padding_frac"] == 0
            for m in (ma, mb):
                best = m["scaling"]["vs_best_one_gpu"]
                assert best["speedup"] > 0 and best["baseline_backend"] in ("grouped_mm", "ep", "ep-dedup", "ep-padded")
            assert set(mb["scaling"]) == set(ma["scaling"]) and mb["scaling"]["weak"]["baseline_case_key"] == \
                ma["scaling"]["weak"]["baseline_case_key"]
    from moebench.report_ep import ep_table
    from moebench.results import read
    rows = ep_table(read(tmp_path / "one.jsonl").records).rows
    assert sorted(r[1] for r in rows) == ["ep", "ep-padded", "ep-pipelined"] and all(r[7].split(" ")[0].endswith("x") for r in rows)  # "(noisy)" may follow


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-9, abs=1e-12)
    return a == b
