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
from moebench.registry import _REGISTRY, Backend, register
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
        _REGISTRY.pop(n, None)


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
