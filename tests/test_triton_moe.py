"""The `triton` backend against `naive` on CPU, under Triton's interpreter.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
TRITON_INTERPRET=1 must be set before triton is imported (triton decorates its own standard library at
import). A module fixture sets it for this module only and restores it afterwards, so other tests (and the
worker processes they spawn) never see it. If something imported triton earlier without it, this module
re-runs itself in a child process with the flag set instead of skipping.
Interpreter block sizes are 32 (tuning.INTERPRET_CFG): the shapes below are chosen around that, with D and F
off multiples of 32, several row/column/reduction tiles, an empty expert, K=1, K=E, E=3/5/6, T=1.
"""
import os
import subprocess
import sys

import pytest
import torch

from implementations.naive import forward as naive
from implementations.triton import moe
from moebench.registry import get

CHILD = os.environ.get("MOEBENCH_TRITON_TEST_CHILD") == "1"


def _triton_is_interpreted() -> bool:
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(std.sigmoid, InterpretedFunction)


_STATE = {"in_process": None}


@pytest.fixture(scope="module", autouse=True)
def interpret_mode():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if "triton" not in sys.modules or _triton_is_interpreted():
            import importlib

            from implementations.triton import kernels
            if not _triton_is_interpreted():
                raise RuntimeError("triton imported without the interpreter")
            if "InterpretedFunction" not in type(kernels.gate_up_kernel).__name__:
                importlib.reload(kernels)
            _STATE["in_process"] = True
        else:
            _STATE["in_process"] = False
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def in_process():
    if not _STATE["in_process"]:
        pytest.skip("triton was imported without TRITON_INTERPRET: covered by test_child_process")


def test_child_process():
    if _STATE["in_process"]:
        pytest.skip("ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", MOEBENCH_TRITON_TEST_CHILD="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_routing(T, E, K, gen, empty=None, hot=None):
    """Distinct top-K experts per token; `empty` gets no token, `hot` is every token's first choice."""
    pool = [e for e in range(E) if e != empty]
    scores = torch.rand(T, len(pool), generator=gen)
    if hot is not None:
        scores[:, pool.index(hot)] = 2.0
    idx_TK = torch.tensor(pool)[scores.topk(K, dim=1).indices]
    p_TK = torch.softmax(torch.randn(T, K, generator=gen), dim=1)
    return idx_TK, p_TK


def make_inputs(T, D, F, E, K, seed, **routing):
    gen = torch.Generator().manual_seed(seed)
    idx_TK, p_TK = make_routing(T, E, K, gen, **routing)
    x_TD = torch.randn(T, D, generator=gen)
    w1_EDF2 = torch.randn(E, D, 2 * F, generator=gen) / D**0.5
    w2_EFD = torch.randn(E, F, D, generator=gen) / F**0.5
    dy_TD = torch.randn(T, D, generator=gen)
    return x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD


def run(fn, x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD, dtype, **opts):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]
    y_TD = fn(leaves[0], idx_TK, leaves[1], leaves[2], leaves[3], **opts)
    y_TD.backward(dy_TD.to(dtype))
    return [y_TD] + [t.grad for t in leaves]


SHAPES = {  # name: (T, D, F, E, K, routing)
    "empty-expert": (13, 40, 36, 5, 2, {"empty": 3}),
    "K1-E6": (17, 40, 36, 6, 1, {}),
    "K=E": (9, 24, 20, 3, 3, {}),
    "T1": (1, 16, 24, 4, 2, {}),
    "multi-tile": (40, 72, 40, 3, 2, {"hot": 0}),  # expert 0: 40 rows = 2 row tiles, 1 full + 1 tail chunk
}
NAMES = ("y", "dx", "dp", "dw1", "dw2")


# fp32 runs unpadded (PAD_TO=0: the masked tile paths), bf16 with the default padding of F and D to 64
CASES = ([(s, torch.float32, 0) for s in SHAPES] + [(s, torch.bfloat16, 64) for s in SHAPES]
         + [("multi-tile", torch.float32, 64), ("K1-E6", torch.bfloat16, 0)])


@pytest.mark.parametrize("shape,dtype,pad", CASES, ids=[f"{s}-{str(d)[6:]}-pad{p}" for s, d, p in CASES])
def test_matches_naive(in_process, monkeypatch, shape, dtype, pad):
    monkeypatch.setattr(moe, "POISON", True)  # every buffer starts as NaN: an unwritten element fails
    monkeypatch.setattr(moe, "PAD_TO", pad)
    T, D, F, E, K, routing = SHAPES[shape]
    inputs = make_inputs(T, D, F, E, K, seed=list(SHAPES).index(shape), **routing)
    if dtype == torch.float32:  # fp32 kernel vs float64 reference
        ref, tol = run(naive, *inputs, torch.float64), 1e-5
    else:  # bf16 kernel vs fp32 reference on the same bf16-rounded inputs
        inputs = [t.to(dtype).float() if t.is_floating_point() else t for t in inputs]
        ref, tol = run(naive, *inputs, torch.float32), 2e-2
    got = run(moe.moe_forward, *inputs, dtype, recompute=100)
    errs = {n: rel(g, r) for n, g, r in zip(NAMES, got, ref)}
    assert all(g.dtype == dtype for g in got)
    assert max(errs.values()) <= tol, errs


def test_recompute_settings(in_process, monkeypatch):
    monkeypatch.setattr(moe, "POISON", True)
    monkeypatch.setattr(moe, "PAD_TO", 0)
    T, D, F, E, K, routing = SHAPES["multi-tile"]
    inputs = make_inputs(T, D, F, E, K, seed=7, **routing)
    ref = run(naive, *inputs, torch.float64)
    saved = {}
    for recompute in (0, 100):
        got = run(moe.moe_forward, *inputs, torch.float32, recompute=recompute)
        errs = {n: rel(g, r) for n, g, r in zip(NAMES, got, ref)}
        assert max(errs.values()) <= 1e-5, (recompute, errs)
        x = inputs[0].clone().requires_grad_()
        y = moe.moe_forward(x, inputs[1], inputs[2], inputs[3], inputs[4], recompute=recompute)
        saved[recompute] = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    # 100 keeps h_SF2 = [x W_g | x W_u] (T*K rows of 2F) on top of the inputs; 0 keeps the inputs only
    assert saved[100] - saved[0] == T * K * 2 * F
    with pytest.raises(ValueError, match="recompute"):
        moe.moe_forward(*inputs[:5], recompute=50)


@pytest.mark.parametrize("pregather", ["1", "0"])
def test_descriptor_path(in_process, monkeypatch, pregather):
    """D and F multiples of 64 (after padding): down and dX run on the tensor-descriptor kernel, recompute=100
    keeps x[tok] in sorted-row order (T*K rows of D more than recompute=0 keeps beside h) and both dW GEMMs
    read sorted operands; with pregather (the default) gate_up and dA' also read sorted copies by descriptor,
    without it they gather and write the copies themselves; still equal to the float64 reference."""
    monkeypatch.setattr(moe, "POISON", True)
    monkeypatch.setenv("MOEBENCH_TRITON_PREGATHER", pregather)
    T, D, F, E, K = 40, 64, 64, 3, 2  # expert 0 hot: 40 rows = 2 row tiles, 1 full + 1 tail chunk
    inputs = make_inputs(T, D, F, E, K, seed=11, hot=0)
    ref = run(naive, *inputs, torch.float64)
    calls = []
    for name in ("rows_gemm_tma", "wgrad_tma", "wgrad", "gate_up_sorted", "gate_up"):
        orig = getattr(moe.Launcher, name)
        monkeypatch.setattr(moe.Launcher, name,
                            lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    got = run(moe.moe_forward, *inputs, torch.float32, recompute=100)
    errs = {n: rel(g, r) for n, g, r in zip(NAMES, got, ref)}
    assert max(errs.values()) <= 1e-5, errs
    if pregather == "1":
        assert sorted(calls) == ["gate_up_sorted"] + ["rows_gemm_tma"] * 3 + ["wgrad_tma"] * 2, calls
    else:
        assert sorted(calls) == ["gate_up"] + ["rows_gemm_tma"] * 2 + ["wgrad_tma"] * 2, calls
    x = inputs[0].clone().requires_grad_()
    saved = {}
    for recompute in (0, 100):
        y = moe.moe_forward(x, inputs[1], inputs[2], inputs[3], inputs[4], recompute=recompute)
        saved[recompute] = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    assert saved[100] - saved[0] == T * K * (2 * F + D)


def test_forward_without_grad_saves_nothing(in_process):
    x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, _ = make_inputs(9, 24, 20, 3, 2, seed=3)
    with torch.no_grad():
        y = moe.moe_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
    assert y.grad_fn is None
    assert rel(y, naive(x_TD.double(), idx_TK, p_TK.double(), w1_EDF2.double(), w2_EFD.double())) <= 1e-5


@pytest.mark.parametrize("BM", [1, 4, 32])
def test_block_schedule_covers_every_row_once(in_process, BM):
    gen = torch.Generator().manual_seed(BM)
    idx_TK, _ = make_routing(50, 7, 3, gen, empty=2, hot=5)
    R = moe.Routing(idx_TK, 7, moe.kernels(True))
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
    assert torch.equal(flat[R.order_S.long()], flat.sort(stable=True).values)
    assert torch.equal(R.tok_S.long(), R.order_S.long() // 3)


def test_registered_with_reasons(monkeypatch):
    b = get("triton")
    assert b.options == {"recompute": 100} and "cpu" in b.devices
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in b.why_not("cpu", "float32")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.why_not("cpu", "float32") is None


def test_pregather_auto_by_F(in_process, monkeypatch):
    """Unforced, x[tok]/dy[tok] are copied before gate_up / dA' only when F >= PREGATHER_MIN_F; the switch forces."""
    monkeypatch.delenv("MOEBENCH_TRITON_PREGATHER", raising=False)
    kn = moe.kernels(True)
    R = moe.Routing(torch.zeros(4, 1, dtype=torch.long), 1, kn)
    x = torch.randn(4, 64)
    big, small = torch.empty(1, 64, 2 * moe.PREGATHER_MIN_F), torch.empty(1, 64, 2 * 64)
    assert moe.Launcher(x, big, R).pregather and not moe.Launcher(x, small, R).pregather
    monkeypatch.setenv("MOEBENCH_TRITON_PREGATHER", "0")
    assert not moe.Launcher(x, big, R).pregather
    monkeypatch.setenv("MOEBENCH_TRITON_PREGATHER", "1")
    assert moe.Launcher(x, small, R).pregather


def test_folded_shared_experts_run_through_the_harness(in_process):
    """triton+shared: the shared experts as always-on experts E.. (every token, weight 1), checked against naive on
    those shapes by the harness, then timed."""
    from moebench import harness
    from moebench.spec import Case, ModelSpec, Workload
    spec = ModelSpec(name="fold", d_model=40, d_expert=36, n_experts=5, top_k=2, n_heads=1, n_shared_experts=2)
    wl = Workload(level="layer", mode="train", batch=1, seq=24, dtype="float32", routing="zipf:1.2", warmup=1,
                  repeats=2)
    rec = harness.run_case(Case(model=spec, backend="triton+shared", workload=wl), "t", {})
    assert rec["status"] == "ok", rec["reason"]
    assert rec["metrics"]["parity"]["ok"] and max(rec["metrics"]["parity"]["errors"].values()) <= 1e-5
