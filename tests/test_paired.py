"""moebench/paired.py and `moebench paired`: grouping, interleaved rotation, ratios from the samples, faults kept
per case."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from implementations.naive import forward as naive_forward
from moebench import paired
from moebench.registry import Backend, register, unregister
from moebench.spec import Case, Workload, preset

calls: list[str] = []


def _logged(name):
    def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
        calls.append(name)
        return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
    return forward


def _raises_late(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    calls.append("late")
    if calls.count("late") > 4:  # parity and warm-up pass; the timed rounds fail
        raise RuntimeError("fails in round 0")
    return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)


@pytest.fixture
def logged():
    names = ["t-a", "t-b", "t-late"]
    register(Backend("t-a", _logged("a"), "test only"))
    register(Backend("t-b", _logged("b"), "test only"))
    register(Backend("t-late", _raises_late, "test only"))
    calls.clear()
    yield
    for n in names:
        unregister(n)


def _case(backend, routing="uniform", **opts):
    wl = Workload(level="layer", mode="train", batch=2, seq=16, dtype="float32", routing=routing, warmup=2,
                  repeats=2)
    return Case(model=preset("tiny"), backend=backend, backend_options=opts, workload=wl)


def test_groups_put_the_base_first_and_drop_what_cannot_pair():
    cs = [_case("shuffle"), _case("naive"), _case("grouped_mm"), _case("shuffle", routing="zipf:1.2"),
          _case("naive", routing="hot:2")]
    gs = paired.groups(cs, "naive")
    assert [[c.backend for c in g] for g in gs] == [["naive", "shuffle", "grouped_mm"]]  # zipf: no base; hot: alone


def test_rounds_interleave_with_rotation_and_ratios_come_from_the_samples(logged):
    rounds, steps = 3, 2
    res = paired.run_group([_case("t-a"), _case("t-b")], rounds, steps)
    # timed part: per round each case runs 1 lead-in + `steps` steps, the order rotated every round
    block = 1 + steps
    tail = calls[-rounds * 2 * block:]
    assert tail == ["a"] * block + ["b"] * block + ["b"] * block + ["a"] * block + ["a"] * block + ["b"] * block
    a, b = res["cases"]
    assert a["status"] == b["status"] == "ok"
    assert [len(r) for r in b["samples_ms"]] == [steps] * rounds
    want = [np.median(ra) / np.median(rb) for ra, rb in zip(a["samples_ms"], b["samples_ms"])]
    assert b["ratio_rounds"] == pytest.approx(want) and b["ratio"] == pytest.approx(np.median(want))
    assert a["ratio"] == 1.0
    lo, hi = b["ratio_ci95"]
    assert lo <= b["ratio"] <= hi


def test_a_case_that_fails_is_reported_and_the_others_still_pair(fault_backends, logged):
    res = paired.run_group([_case("naive"), _case("fault-wrong"), _case("t-late"), _case("fault-raise"),
                            _case("shuffle")], rounds=2, steps=1)
    st = {e["backend"]: (e["status"], e.get("reason", "")) for e in res["cases"]}
    assert st["fault-wrong"][0] == "mismatch" and "vs naive" in st["fault-wrong"][1]
    assert st["fault-raise"][0] == "failed" and "ValueError" in st["fault-raise"][1]
    assert st["t-late"][0] == "failed" and "round 0" in st["t-late"][1] and "fails in round 0" in st["t-late"][1]
    assert st["naive"][0] == st["shuffle"][0] == "ok"
    shuffle = next(e for e in res["cases"] if e["backend"] == "shuffle")
    assert len(shuffle["ratio_rounds"]) == 2 and shuffle["ratio_ci95"] is None  # < 3 rounds: no interval


def test_the_only_case_left_to_run_is_skipped_not_ok(fault_backends):
    # protection: run_group's `if not allms` (no rounds ran: no timing, so no `ok` with a NaN median)
    res = paired.run_group([_case("naive"), _case("fault-raise")], rounds=2, steps=1)
    st = {e["backend"]: (e["status"], e.get("reason", "")) for e in res["cases"]}
    assert st["fault-raise"][0] == "failed"
    assert st["naive"] == ("skipped", "no other case of its group ran: nothing to pair with"), st
    assert all(e["ratio"] is None for e in res["cases"])


def test_cli_paired_writes_json_and_names_a_missing_base(tmp_path, cli_env):
    out = tmp_path / "p.json"
    ok = subprocess.run([sys.executable, "-m", "moebench", "paired", "-s", "ci", "-b", "naive,shuffle", "-m", "tiny-layer",
                         "-m", "layer/train", "-m", "learned", "-d", "cpu", "-r", "2", "--steps", "1", "-o", str(out)],
                        capture_output=True, text=True, env=cli_env, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    res = json.loads(out.read_text())
    assert res["kind"] == "moebench-paired" and res["env"]["device"] == "cpu" and res["groups"]
    assert {e["backend"] for g in res["groups"] for e in g["cases"]} == {"naive", "shuffle"}
    md = out.with_suffix(".md").read_text().splitlines()
    rows = [r for r in md if r.startswith("| tiny-layer")]
    assert len(rows) == 2 and all(r.count("|") == 10 for r in rows)  # group labels must not split the columns
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "moebench", "paired", "-s", "ci", "-b", "grouped_mm,shuffle", "-m",
                          "no-such-model", "-d", "cpu"], capture_output=True, text=True, env=cli_env, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "base backend 'grouped_mm'" in bad.stderr
    if not torch.cuda.is_available():
        nocuda = subprocess.run([sys.executable, "-m", "moebench", "paired", "-s", "ci", "-b", "naive,shuffle", "-d",
                                 "cuda"], capture_output=True, text=True, env=cli_env, timeout=120, check=False)
        assert nocuda.returncode == 2 and "torch.cuda.is_available() is False" in nocuda.stderr


def _fake_smi(tmp_path, line):
    """A stand-in for nvidia-smi: prints one sample line every 10 ms until stopped (it ignores its arguments)."""
    exe = tmp_path / "fake-smi"
    exe.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.01; done\n")
    exe.chmod(0o755)
    return str(exe)


def test_telemetry_samples_land_with_the_case_that_ran(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_SMI", _fake_smi(tmp_path, "1500, 690.5, 61, 0x0000000000000004"))
    res = paired.run_group([_case("t-a"), _case("t-b")], rounds=3, steps=30)
    for e in res["cases"]:
        tel = e["telemetry"]
        assert tel["n"] >= 1 and tel["sm_mhz_mean"] == 1500 and tel["power_w_max"] == 690.5
        assert tel["power_cap_frac"] == 1.0 and tel["thermal_frac"] == 0.0


def test_telemetry_missing_tool_is_said_not_invented(logged, monkeypatch):
    monkeypatch.setenv("MOEBENCH_SMI", "no-such-smi-tool")
    res = paired.run_group([_case("t-a"), _case("t-b")], rounds=2, steps=1)
    assert all(e["telemetry"] == {"error": "no-such-smi-tool not found: no clock/power samples"}
               for e in res["cases"])


def test_telemetry_parses_and_summarises():
    from moebench import telemetry
    s = [(0.0, 1980.0, 500.0, 50.0, 0x1), (1.0, 1200.0, 700.0, 70.0, 0x4), (2.0, 1500.0, 650.0, 80.0, 0x24)]
    got = telemetry.summarise(s)
    assert got["n"] == 3 and got["sm_mhz_min"] == 1200 and got["power_cap_frac"] == pytest.approx(2 / 3)
    assert got["thermal_frac"] == pytest.approx(1 / 3) and got["temp_c_max"] == 80
    assert telemetry.summarise([]) is None


def _saved(groups):
    """A saved paired result: groups of (backend label part, status, per-round step times in ms)."""
    def entry(model, b, status, rounds):
        e = {"label": f"{model} | {b} | layer/train float32 2x16 uniform", "backend": b.split(",")[0],
             "status": status, "reason": "" if status == "ok" else "why"}
        if status == "ok":
            e |= {"samples_ms": rounds, "step_ms_p50": float(np.median(rounds)), "tokens_per_s_p50": 1.0,
                  "tflops": 1.0}
        return e
    return {"kind": paired.KIND, "schema": paired.SCHEMA, "rounds": 4, "steps": 2, "base_backend": "naive",
            "env": {"cpu": "test"}, "groups": [{"group": f"{m} | w", "base": "", "cases": [entry(m, *c) for c in cs]}
                                               for m, cs in groups]}


def test_rebase_takes_ratios_against_another_backend_round_by_round():
    base = [[10.0, 10.2], [12.0, 12.4], [10.0, 10.0], [11.0, 11.0]]
    fast = [[5.0, 5.2], [4.0, 4.0], [5.0, 5.0], [5.5, 5.5]]  # its own round-to-round drift: ratios differ per round
    other = [[20.0, 20.0], [24.0, 24.0], [20.0, 20.0], [22.0, 22.0]]
    res = _saved([("m1", [("naive", "ok", base), ("triton,recompute=100", "ok", fast), ("shuffle", "ok", other)]),
                  ("m2", [("naive", "ok", base), ("shuffle", "failed", None)])])
    rb = paired.rebase(res, "triton,recompute=100")
    g1, g2 = rb["groups"]
    assert rb["base_backend"] == "triton,recompute=100" and rb["rebased_from"] == "naive"
    assert paired.backend_of(g1["cases"][0]) == "triton,recompute=100" and g1["base"] == g1["cases"][0]["label"]
    nv = next(e for e in g1["cases"] if e["backend"] == "naive")
    want = [np.median(f) / np.median(b) for b, f in zip(base, fast)]  # triton's time over naive's, per round
    assert nv["ratio_rounds"] == pytest.approx(want) and nv["ratio"] == pytest.approx(np.median(want))
    assert nv["ratio_ci95"][0] <= nv["ratio"] <= nv["ratio_ci95"][1]
    sh = next(e for e in g1["cases"] if e["backend"] == "shuffle")
    assert sh["ratio_rounds"] == pytest.approx([np.median(f) / np.median(o) for o, f in zip(other, fast)])
    # a group without the new base keeps its cases, with no ratio and the reason
    assert all(e["ratio"] is None and "no ok case of triton" in e["why_no_ratio"] for e in g2["cases"])
    assert "ratio_rounds" not in g2["cases"][0]
    # back to the first base: the ratios of the run itself, and the saved result is untouched
    res0 = paired.rebase(res, "naive")
    t = next(e for e in res0["groups"][0]["cases"] if e["backend"] == "triton")
    assert t["ratio_rounds"] == pytest.approx([np.median(b) / np.median(f) for b, f in zip(base, fast)])
    assert "ratio" not in res["groups"][0]["cases"][1] and res["base_backend"] == "naive"
    with pytest.raises(ValueError, match="valid: naive, shuffle, triton,recompute=100"):
        paired.rebase(res, "sonicmoe")


def test_cli_paired_from_rebases_a_saved_file_and_names_bad_input(tmp_path, cli_env):
    src = tmp_path / "saved.json"
    base, fast = [[10.0], [12.0], [10.0]], [[5.0], [4.0], [5.0]]
    src.write_text(json.dumps(_saved([("m1", [("naive", "ok", base), ("triton,recompute=100", "ok", fast)])])))
    out = tmp_path / "re" / "b.json"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moebench", "paired", *args], capture_output=True, text=True,
                              env=cli_env, timeout=120, check=False)
    ok = cli("--from", str(src), "-b", "triton,recompute=100", "-o", str(out))  # a base with options: one name
    assert ok.returncode == 0, ok.stderr
    res = json.loads(out.read_text())
    nv = next(e for e in res["groups"][0]["cases"] if e["backend"] == "naive")
    assert nv["ratio_rounds"] == pytest.approx([0.5, 4 / 12, 0.5])
    assert "re-based from `naive`" in out.with_suffix(".md").read_text()
    bad = cli("--from", str(src), "-b", "sonicmoe")
    assert bad.returncode == 2 and "valid: naive, triton,recompute=100" in bad.stderr and str(src) in bad.stderr
    both = cli("--from", str(src), "-b", "shuffle", "-s", "ci")
    assert both.returncode == 2 and "no --suite" in both.stderr
    notpaired = tmp_path / "x.json"
    notpaired.write_text("{}")
    assert "not a `moebench paired` result" in cli("--from", str(notpaired), "-b", "shuffle").stderr
    assert "cannot read" in cli("--from", str(tmp_path / "missing.json"), "-b", "shuffle").stderr
    assert "--suite is required" in cli("-b", "naive,shuffle").stderr


def test_a_group_that_kills_its_worker_costs_that_group_only(tmp_path, fault_backends):
    """Each group runs in a worker process of its own: a backend that SIGKILLs its process ends its group as
    `failed` with the reason; the next group still pairs."""
    suite = tmp_path / "two.toml"
    suite.write_text(
        'max_time_s = 0.3\ntimeout_s = 120\n'
        '[[matrix]]\nbackends = ["naive", "fault-kill"]\nmodels = [{ preset = "tiny-layer" }]\n'
        '[[matrix.workloads]]\nmode = "train"\nbatch = 2\nseq = 16\nwarmup = 1\nrepeats = 2\n'
        '[[matrix]]\nbackends = ["naive", "shuffle"]\nmodels = [{ preset = "tiny-layer" }]\n'
        '[[matrix.workloads]]\nmode = "forward"\nbatch = 2\nseq = 16\nwarmup = 1\nrepeats = 2\n')
    from moebench.suite import load
    res = paired.run(load(str(suite)), "naive", rounds=3, steps=2, log_path=tmp_path / "p.log")
    first, second = res["groups"]
    assert {e["status"] for e in first["cases"]} == {"failed"}
    assert all("killed by signal SIGKILL" in e["reason"] for e in first["cases"]), first["cases"]
    assert [e["status"] for e in second["cases"]] == ["ok", "ok"] and second["cases"][1]["ratio"] > 0
