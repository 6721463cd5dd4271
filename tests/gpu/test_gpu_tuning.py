"""GPU tier: the Triton autotuner and its cache (implementations/triton/tuning.py). A first call at a new shape
times every config of each kernel it launches, keeps the fastest and writes them to MOEBENCH_TRITON_CACHE; with the
in-memory state reset, and in a fresh process, the same configs come back from that file without timing anything.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from implementations.triton import moe, tuning
from tests.moecheck import TOL, check, make_inputs

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1024, 512, 1024, 8, 2)  # T, D, F, E, K: bf16, aligned; forward + backward at recompute=100
# a fresh process: the same forward + backward, timing forbidden, prints what it picked (read from the cache)
FRESH = """
import json, sys
import torch
from implementations.triton import moe, tuning
from tests.moecheck import make_inputs, run
def no_timing(fn, reps=3):
    raise AssertionError("the tuner timed a config although the cache has it")
tuning._time = no_timing
run(moe.moe_forward, *make_inputs(*json.loads(sys.argv[1]), seed=3), torch.bfloat16, "cuda", recompute=100)
print(json.dumps({k: list(v) for k, v in tuning.tuned().items()}))
"""


@pytest.fixture
def fresh_tuner(tmp_path, monkeypatch):
    """An empty in-memory tuner that tunes (MOEBENCH_TRITON_TUNE unset) into a cache file of its own."""
    cache = tmp_path / "tune.json"
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(cache))
    monkeypatch.delenv("MOEBENCH_TRITON_TUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tuning, "_mem", {})
    monkeypatch.setattr(tuning, "_disk_loaded", False)
    return cache


@pytest.mark.timeout(600)
def test_tunes_once_writes_the_cache_and_reads_it_back(fresh_tuner, monkeypatch):
    cache = fresh_tuner
    real_time, timed = tuning._time, []
    monkeypatch.setattr(tuning, "_time", lambda fn, reps=3: timed.append(1) or real_time(fn, reps))
    inputs = make_inputs(*SHAPE, seed=3)
    errs = check(moe.moe_forward, inputs, torch.bfloat16, "cuda", recompute=100)  # the picked configs are right
    assert max(errs.values()) <= TOL[torch.bfloat16], errs
    picked = {k: list(v) for k, v in tuning.tuned().items()}
    kinds = {k.split("|")[0] for k in picked}
    assert {"down_tma", "dx_tma"} <= kinds or {"down", "dx"} <= kinds, kinds  # forward and backward were tuned
    for key, cfg in picked.items():
        assert tuning.Cfg(*cfg) in tuning.CONFIGS[key.split("|")[0]], (key, cfg)
    # every config of every tuned kernel that has more than one was timed, each once
    assert len(timed) == sum(len(tuning.CONFIGS[k.split("|")[0]]) for k in picked
                             if len(tuning.CONFIGS[k.split("|")[0]]) > 1) > 0
    on_disk = json.loads(cache.read_text())
    assert list(on_disk) == [tuning._device_tag()] and on_disk[tuning._device_tag()] == picked

    # the in-memory state reset: the same picks, read from the file, nothing timed
    monkeypatch.setattr(tuning, "_mem", {})
    monkeypatch.setattr(tuning, "_disk_loaded", False)
    n_timed = len(timed)
    check(moe.moe_forward, inputs, torch.bfloat16, "cuda", recompute=100)
    assert len(timed) == n_timed and {k: list(v) for k, v in tuning.tuned().items()} == picked

    # a fresh process with the same cache file
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", FRESH, json.dumps(SHAPE)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == picked


def test_an_unreadable_cache_is_retuned_not_fatal(fresh_tuner):
    fresh_tuner.write_text("{ not json")
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, _ = (t.cuda() for t in make_inputs(256, 128, 128, 4, 2, seed=4))
    with torch.no_grad():
        y_TD = moe.moe_forward(x_TD.bfloat16(), idx_TK, p_TK.bfloat16(), w1_EDF2.bfloat16(), w2_EFD.bfloat16())
    assert torch.isfinite(y_TD).all() and tuning.tuned()
    assert json.loads(fresh_tuner.read_text())[tuning._device_tag()] == {k: list(v) for k, v in tuning.tuned().items()}
