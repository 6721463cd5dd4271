"""The `triton` backend against `naive`: on the GPU when CUDA is there, else on CPU under Triton's interpreter.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
On CUDA the kernels are compiled and run on the GPU in this process, untuned (MOEBENCH_TRITON_TUNE=0: each kernel's
first config; the tuner and bigger, unaligned shapes are the GPU tier's, tests/gpu/test_gpu_triton.py).
On CPU, TRITON_INTERPRET=1 must be set before triton is imported (triton decorates its own standard library at
import). A module fixture sets it for this module only and restores it afterwards, so other tests (and the
worker processes they spawn) never see it. If something imported triton earlier without it, this module
re-runs itself in a child process with the flag set instead of skipping.
Interpreter block sizes are 32 (tuning.INTERPRET_CFG): the shapes below are chosen around that, with D and F
off multiples of 32, several row/column/reduction tiles, an empty expert, K=1, K=E, E=3/5/6, T=1.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import version

import numpy as np
import pytest
import torch

from implementations.naive import forward as naive
from implementations.triton import moe
from moebench.metrics import rel_err
from moebench.registry import get
from tests.moecheck import NAMES, TOL, check, make_inputs, make_routing, run

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
CHILD = os.environ.get("MOEBENCH_TRITON_TEST_CHILD") == "1"


def _release(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels here (the versions named), or None."""
    tv, nv = version("triton"), np.__version__
    if _release(tv) < (3, 7) and _release(nv) >= (2, 4):
        return (f"triton {tv}'s interpreter cannot run a kernel with a runtime loop bound under numpy {nv} "
                "(int() of a 1-element array; triton-lang/triton#9171, fixed in triton 3.7)")
    return None


def _triton_is_interpreted() -> bool:
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(std.sigmoid, InterpretedFunction)


_STATE = {"in_process": None, "skip": None}


@pytest.fixture(scope="module", autouse=True)
def triton_mode():
    with pytest.MonkeyPatch.context() as mp:
        if CUDA:  # compiled for the GPU; untuned, so a test run compiles one config per kernel
            mp.delenv("TRITON_INTERPRET", raising=False)
            mp.setenv("MOEBENCH_TRITON_TUNE", "0")
            _STATE["in_process"] = True
            if "triton" in sys.modules and _triton_is_interpreted():
                _STATE["skip"] = "triton was imported under TRITON_INTERPRET=1 in this process: no GPU kernels here"
            yield
            return
        mp.setenv("TRITON_INTERPRET", "1")
        if "triton" not in sys.modules or _triton_is_interpreted():
            import importlib

            from implementations.triton import kernels
            if not _triton_is_interpreted():
                raise RuntimeError("triton imported without the interpreter")
            if "InterpretedFunction" not in type(kernels.gate_up_kernel).__name__:
                importlib.reload(kernels)
            _STATE["in_process"] = True
            _STATE["skip"] = interpreter_problem()
        else:
            _STATE["in_process"] = False
            _STATE["skip"] = "triton was imported without TRITON_INTERPRET: covered by test_child_process"
        yield


@pytest.fixture
def in_process():
    if _STATE["skip"]:
        pytest.skip(_STATE["skip"])


def test_child_process(tmp_path):
    """On CPU, when this process imported triton without the interpreter: every test of this module in a child
    process with TRITON_INTERPRET=1, each of which must have run there (a child whose tests all skip fails)."""
    if CUDA:
        pytest.skip("CUDA: the kernels run on the GPU in this process")
    if CHILD or _STATE["in_process"]:
        pytest.skip("ran in this process")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    xml = tmp_path / "child.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env |= {"TRITON_INTERPRET": "1", "MOEBENCH_TRITON_TEST_CHILD": "1"}
    # its own tmp dirs and no xdist: safe beside other pytest processes (pytest -n N)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          f"--basetemp={tmp_path / 'child'}", f"--junitxml={xml}", __file__],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    not_run = [n for n, c in cases.items() if n != "test_child_process" and c.find("skipped") is not None]
    assert len(cases) > 20 and not not_run, (len(cases), not_run)


SHAPES = {  # name: (T, D, F, E, K, routing)
    "empty-expert": (13, 40, 36, 5, 2, {"empty": 3}),
    "K1-E6": (17, 40, 36, 6, 1, {}),
    "K=E": (9, 24, 20, 3, 3, {}),
    "T1": (1, 16, 24, 4, 2, {}),
    "multi-tile": (40, 72, 40, 3, 2, {"hot": 0}),  # expert 0: 40 rows = 2 row tiles, 1 full + 1 tail chunk
}


# fp32 runs unpadded (PAD_TO=0: the masked tile paths), bf16 with the default padding of F and D to 64
CASES = ([(s, torch.float32, 0) for s in SHAPES] + [(s, torch.bfloat16, 64) for s in SHAPES]
         + [("multi-tile", torch.float32, 64), ("K1-E6", torch.bfloat16, 0)])


@pytest.mark.parametrize("shape,dtype,pad", CASES, ids=[f"{s}-{str(d)[6:]}-pad{p}" for s, d, p in CASES])
def test_matches_naive(in_process, monkeypatch, shape, dtype, pad):
    monkeypatch.setattr(moe, "POISON", True)  # every buffer starts as NaN: an unwritten element fails
    monkeypatch.setattr(moe, "PAD_TO", pad)
    T, D, F, E, K, routing = SHAPES[shape]
    inputs = make_inputs(T, D, F, E, K, seed=list(SHAPES).index(shape), **routing)
    errs = check(moe.moe_forward, inputs, dtype, DEV, recompute=100)
    assert max(errs.values()) <= TOL[dtype], errs


def test_recompute_settings(in_process, monkeypatch):
    monkeypatch.setattr(moe, "POISON", True)
    monkeypatch.setattr(moe, "PAD_TO", 0)
    T, D, F, E, K, routing = SHAPES["multi-tile"]
    inputs = make_inputs(T, D, F, E, K, seed=7, **routing)
    saved = {}
    for recompute in (0, 100):
        errs = check(moe.moe_forward, inputs, torch.float32, DEV, recompute=recompute)
        assert max(errs.values()) <= 1e-5, (recompute, errs)
        x = inputs[0].to(DEV).requires_grad_()
        y = moe.moe_forward(x, *(t.to(DEV) for t in inputs[1:5]), recompute=recompute)
        saved[recompute] = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    # 100 keeps h_SF2 = [x W_g | x W_u] (T*K rows of 2F) on top of the inputs; 0 keeps the inputs only
    assert saved[100] - saved[0] == T * K * 2 * F
    with pytest.raises(ValueError, match="recompute"):
        moe.moe_forward(*(t.to(DEV) for t in inputs[:5]), recompute=50)


@pytest.mark.parametrize("pregather", ["on", "off"])
def test_descriptor_path(in_process, monkeypatch, pregather):
    """D and F multiples of 64 (after padding): down and dX run on the tensor-descriptor kernel, recompute=100
    keeps x[tok] in sorted-row order (T*K rows of D more than recompute=0 keeps beside h) and both dW GEMMs
    read sorted operands; with pregather (the default) gate_up and dA' also read sorted copies by descriptor,
    without it they gather and write the copies themselves; still equal to the float64 reference."""
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip(f"tensor descriptors (TMA) need compute capability >= 9, this GPU has "
                    f"{torch.cuda.get_device_capability()}")
    monkeypatch.setattr(moe, "POISON", True)
    T, D, F, E, K = 40, 64, 64, 3, 2  # expert 0 hot: 40 rows = 2 row tiles, 1 full + 1 tail chunk
    inputs = make_inputs(T, D, F, E, K, seed=11, hot=0)
    calls = []
    for name in ("rows_gemm_tma", "wgrad_tma", "wgrad", "gate_up_sorted", "gate_up"):
        orig = getattr(moe.Launcher, name)
        monkeypatch.setattr(moe.Launcher, name,
                            lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    ref = run(naive, *inputs, torch.float64, DEV)
    calls.clear()
    got = run(moe.moe_forward, *inputs, torch.float32, DEV, recompute=100, pregather=pregather)
    errs = {n: rel_err(g, r) for n, g, r in zip(NAMES, got, ref)}
    assert max(errs.values()) <= 1e-5, errs
    if pregather == "on":
        assert sorted(calls) == ["gate_up_sorted"] + ["rows_gemm_tma"] * 3 + ["wgrad_tma"] * 2, calls
    else:
        assert sorted(calls) == ["gate_up"] + ["rows_gemm_tma"] * 2 + ["wgrad_tma"] * 2, calls
    x = inputs[0].to(DEV).requires_grad_()
    saved = {}
    for recompute in (0, 100):
        y = moe.moe_forward(x, *(t.to(DEV) for t in inputs[1:5]), recompute=recompute, pregather=pregather)
        saved[recompute] = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    assert saved[100] - saved[0] == T * K * (2 * F + D)


def test_forward_without_grad_saves_nothing(in_process):
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, _ = (t.to(DEV) for t in make_inputs(9, 24, 20, 3, 2, seed=3))
    with torch.no_grad():
        y = moe.moe_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
    assert y.grad_fn is None
    assert rel_err(y, naive(x_TD.double(), idx_TK, p_TK.double(), w1_EDF2.double(), w2_EFD.double())) <= 1e-5


@pytest.mark.parametrize("BM", [1, 4, 32])
def test_block_schedule_covers_every_row_once(in_process, BM):
    gen = torch.Generator().manual_seed(BM)
    idx_TK, _ = make_routing(50, 7, 3, gen, empty=2, hot=5)
    R = moe.Routing(idx_TK.to(DEV), 7, moe.kernels(not CUDA))
    tile_e, tile_r0, n = R.schedule(BM)
    seen = torch.zeros(R.S, dtype=torch.long)
    for e, r0 in zip(tile_e.tolist(), tile_r0.tolist()):
        if e < 0:
            continue
        rows = torch.arange(r0, min(r0 + BM, int(R.ends_E[e])))
        assert rows.numel() > 0 and int(R.starts_E[e]) <= r0
        seen[rows] += 1
    assert seen.eq(1).all() and tile_e.numel() == n
    flat = idx_TK.reshape(-1)
    assert torch.equal(flat[R.order_S.long().cpu()], flat.sort(stable=True).values)
    assert torch.equal(R.tok_S.long().cpu(), R.order_S.long().cpu() // 3)


def test_registered_with_reasons(monkeypatch):
    b = get("triton")
    assert b.options == {"recompute": 100, "wdesc": True, "pregather": "auto"} and "cpu" in b.devices
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in b.why_not("cpu", "float32")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.why_not("cpu", "float32") is None
    assert b.validate({"recompute": 0}) is None and b.validate({"recompute": 100}) is None
    assert "recompute must be 0" in b.validate({"recompute": 50})


def test_pregather_auto_by_F(in_process, monkeypatch):
    """Unforced, x[tok]/dy[tok] are copied before gate_up / dA' only when F >= PREGATHER_MIN_F; the option forces."""
    kn = moe.kernels(not CUDA)
    R = moe.Routing(torch.zeros(4, 1, dtype=torch.long, device=DEV), 1, kn)
    x = torch.randn(4, 64, device=DEV)
    big, small = torch.empty(1, 64, 2 * moe.PREGATHER_MIN_F, device=DEV), torch.empty(1, 64, 2 * 64, device=DEV)
    if not moe.Launcher(x, big, R).tma:
        pytest.skip(f"no tensor-descriptor path here (compute capability {torch.cuda.get_device_capability()} < 9)")
    assert moe.Launcher(x, big, R).pregather and not moe.Launcher(x, small, R).pregather
    assert not moe.Launcher(x, big, R, pregather="off").pregather
    assert moe.Launcher(x, small, R, pregather="on").pregather
    with pytest.raises(ValueError, match="pregather must be one of auto, on, off"):
        moe.Launcher(x, small, R, pregather="1")


def test_folded_shared_experts_run_through_the_harness(in_process):
    """triton+shared: the shared experts as always-on experts E.. (every token, weight 1), checked against naive on
    those shapes by the harness, then timed."""
    from moebench import harness
    from moebench.spec import Case, ModelSpec, Workload
    spec = ModelSpec(name="fold", d_model=40, d_expert=36, n_experts=5, top_k=2, n_heads=1, n_shared_experts=2)
    wl = Workload(level="layer", mode="train", batch=1, seq=24, dtype="float32", routing="zipf:1.2", warmup=1,
                  repeats=2)
    rec = harness.run_case(Case(model=spec, backend="triton+shared", workload=wl, device=DEV, max_time_s=0.3),
                           "t", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["parity"]["ok"] and max(rec["metrics"]["parity"]["errors"].values()) <= 1e-5
