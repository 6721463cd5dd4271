"""Expert-block parity helpers shared by tests/test_triton_moe.py (CPU interpreter or GPU) and the GPU tier
(tests/gpu/): fresh random inputs with a chosen routing, one forward + backward, and the reference in higher
precision.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
check(fn, inputs, dtype, device) runs `fn` on the inputs in `dtype` and `naive` in higher precision (fp32 inputs:
float64 reference; bf16: the same bf16-rounded inputs in float32) and returns the relative error
||a - b|| / ||b|| of the output and of every gradient (x, p, w1, w2), with the harness's tolerance for dtype.
"""
from __future__ import annotations

import torch

from implementations.naive import forward as naive
from moebench.metrics import rel_err

NAMES = ("y", "dx", "dp", "dw1", "dw2")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # the harness's parity tolerances (README, "parity")


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
    """(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD) on the CPU, float32, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    idx_TK, p_TK = make_routing(T, E, K, gen, **routing)
    x_TD = torch.randn(T, D, generator=gen)
    w1_EDF2 = torch.randn(E, D, 2 * F, generator=gen) / D**0.5
    w2_EFD = torch.randn(E, F, D, generator=gen) / F**0.5
    dy_TD = torch.randn(T, D, generator=gen)
    return x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD


def run(fn, x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, dy_TD, dtype, device="cpu", **opts):
    """[y, dx, dp, dw1, dw2] of fn on copies of the inputs in dtype on device."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (x_TD, p_TK, w1_EDF2, w2_EFD)]
    y_TD = fn(leaves[0], idx_TK.to(device), leaves[1], leaves[2], leaves[3], **opts)
    y_TD.backward(dy_TD.to(device, dtype))
    return [y_TD] + [t.grad for t in leaves]


def check(fn, inputs, dtype, device="cpu", **opts) -> dict:
    """{name: relative error} of fn in dtype against naive in higher precision, on the same inputs."""
    if dtype == torch.float32:  # fp32 kernel vs float64 reference
        ref = run(naive, *inputs, torch.float64, device)
    else:  # bf16 kernel vs fp32 reference on the same bf16-rounded inputs
        inputs = [t.to(dtype).float() if t.is_floating_point() else t for t in inputs]
        ref = run(naive, *inputs, torch.float32, device)
    got = run(fn, *inputs, dtype, device, **opts)
    assert all(g.dtype == dtype and g.device.type == device for g in got), [(g.dtype, g.device) for g in got]
    return {n: rel_err(g, r) for n, g, r in zip(NAMES, got, ref)}
