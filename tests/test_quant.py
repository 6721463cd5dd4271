"""FP8 e4m3 rowwise quantisation (moebench/quant.py) and the fp8 reference (moebench/fp8ref.py), on CPU: round-trip
error bounds from e4m3's 3 mantissa bits, scale correctness, exactly representable inputs, zero rows, bf16 and fp32
inputs quantising to the same bits, the straight-through GEMM, and the reference's per-row independence of grouping.

Legend: N rows, K reduced dim, M output columns, T tokens, D model dim, F expert hidden, E experts, K top-k (fp8ref).
Every input is drawn fresh from a seeded generator, with rows spanning many orders of magnitude.
"""
import math

import pytest
import torch

from implementations import naive
from moebench import fp8ref, metrics, quant


def wide(N: int, M: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random rows whose magnitudes span 1e-6 .. 1e6 (the scale must follow each row), with a few tiny elements."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, M, generator=g) * torch.logspace(-6, 6, N).unsqueeze(-1)
    x[:, :3] *= 1e-4  # elements far below their row's max: e4m3 subnormals after scaling
    return x.to(dtype)


def bound_ok(x: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """quant's documented round-trip bound, elementwise."""
    x, r = x.double(), r.double()
    normal = x.abs() / s >= quant.E4M3_MIN_NORMAL
    lim = torch.where(normal, quant.E4M3_REL_HALF_ULP * x.abs(), quant.E4M3_SUBNORMAL_HALF_STEP * s.double())
    return (r - x).abs() <= lim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, -2])
def test_round_trip_within_e4m3_bound(dtype, dim):
    x = wide(64, 96, seed=1 + dim, dtype=dtype)
    if dim == -2:
        x = x.t().contiguous()   # columns span the magnitudes now: a weight's per-column scale
    q, s = quant.quantize(x, dim)
    assert q.dtype == quant.E4M3 and s.dtype == torch.float32
    assert s.shape == tuple(1 if i == x.dim() + dim else n for i, n in enumerate(x.shape))
    r = quant.dequantize(q, s)
    assert torch.isfinite(r).all() and bound_ok(x, r, s).all()
    rel = ((r - x.float()).abs() / x.float().abs())[x.float().abs() / s >= quant.E4M3_MIN_NORMAL]
    # the bound is reached, not vacuous: some values lose almost half an ulp, none is exact by accident everywhere
    assert 0.75 * quant.E4M3_REL_HALF_ULP < rel.max() <= quant.E4M3_REL_HALF_ULP
    assert 0.005 < rel.mean() < 0.03


def test_scales_are_amax_based_powers_of_two():
    x = wide(48, 80, seed=3)
    amax = x.abs().amax(-1, keepdim=True)
    q, s = quant.quantize(x, -1)
    m, _ = torch.frexp(s)
    assert (m == 0.5).all()                                        # a power of two
    assert ((amax / s > 224) & (amax / s <= 448)).all()            # the smallest one with amax / s <= 448
    # the row's largest element lands at the top of e4m3's range (just over 224 may round down to 224), sign kept
    top = x.abs().argmax(-1, keepdim=True)
    qtop = q.float().gather(-1, top)
    assert (qtop.abs() >= 224).all() and (qtop.sign() == x.gather(-1, top).sign()).all()


def test_exactly_representable_values_round_trip_exactly():
    """x = e4m3 codes * 2^j per row, each row holding one code in (224, 448]: the scale is exactly 2^j and every value
    comes back bit for bit (subnormal codes included)."""
    g = torch.Generator().manual_seed(5)
    all_codes = torch.arange(256, dtype=torch.uint8).view(quant.E4M3).float()
    all_codes = all_codes[torch.isfinite(all_codes)]
    codes = all_codes[torch.randint(len(all_codes), (40, 64), generator=g)]
    top = torch.tensor([256.0, 288, 320, 352, 384, 416, 448])
    codes[:, 0] = top[torch.randint(len(top), (40,), generator=g)] * torch.where(torch.rand(40, generator=g) < 0.5, -1, 1)
    j = torch.randint(-20, 20, (40, 1), generator=g).float()
    x = codes * torch.exp2(j)
    q, s = quant.quantize(x, -1)
    assert torch.equal(s, torch.exp2(j)) and torch.equal(quant.dequantize(q, s), x)
    assert (codes.abs() < quant.E4M3_MIN_NORMAL).logical_and(codes != 0).any()  # subnormals were in the draw


def test_bf16_and_fp32_inputs_quantise_to_the_same_bits():
    """What a bf16 backend computes in bf16 and the reference in fp32 from the same values: identical codes."""
    xb = wide(64, 128, seed=6, dtype=torch.bfloat16)
    qb, sb = quant.quantize(xb, -1)
    qf, sf = quant.quantize(xb.float(), -1)
    assert torch.equal(qb.view(torch.uint8), qf.view(torch.uint8)) and torch.equal(sb, sf)


def test_quantise_into_a_column_major_buffer_gives_the_same_codes():
    w = wide(48, 64, seed=12, dtype=torch.bfloat16).t().contiguous().unsqueeze(0).repeat(3, 1, 1)  # (E, K, M)
    q, s = quant.quantize(w, -2)
    buf = torch.empty(3, 48, 64, dtype=quant.E4M3).transpose(-2, -1)   # (E, K, M) view, column-major
    q2, s2 = quant.quantize(w, -2, out=buf)
    assert q2.data_ptr() == buf.data_ptr() and q2.stride(-2) == 1 and torch.equal(s2, s)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_zero_rows_and_extreme_magnitudes_stay_finite():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 32, generator=g)
    x[1] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-30
    q, s = quant.quantize(x, -1)
    r = quant.dequantize(q, s)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(r).all()
    assert (r[1] == 0).all() and bound_ok(x, r, s).all()


def test_fp8_matmul_forward_is_quantised_backward_is_straight_through():
    g = torch.Generator().manual_seed(8)
    a = (torch.randn(24, 40, generator=g) * torch.logspace(-2, 2, 24).unsqueeze(-1)).requires_grad_()
    b = (torch.randn(40, 56, generator=g) / 6).requires_grad_()
    dy = torch.randn(24, 56, generator=g)
    y = quant.fp8_matmul(a, b)
    torch.testing.assert_close(y, quant.fake_quant(a.detach(), -1) @ quant.fake_quant(b.detach(), -2))
    assert 0.01 < metrics.rel_err(y.detach(), a.detach() @ b.detach()) < 0.1  # quantised: visibly not a @ b
    y.backward(dy)
    torch.testing.assert_close(a.grad, dy @ b.detach().t())
    torch.testing.assert_close(b.grad, a.detach().t() @ dy)


def moe_inputs(T=40, D=32, Fh=24, E=5, K=2, seed=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype) * torch.logspace(-1, 1, T, dtype=dtype).unsqueeze(-1)
    w1 = torch.randn(E, D, 2 * Fh, generator=g, dtype=dtype) / math.sqrt(D)
    w2 = torch.randn(E, Fh, D, generator=g, dtype=dtype) / math.sqrt(Fh)
    p = torch.rand(T, K, generator=g, dtype=dtype) + 0.05
    idx = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
    return x, idx, p, w1, w2


def test_reference_rows_do_not_depend_on_the_batch():
    """Per-row / per-column scales: a token's output is the same whether it is quantised among all tokens or among a
    few (a per-tensor scale would change it: the batch here spans two orders of magnitude)."""
    x, idx, p, w1, w2 = moe_inputs()
    y = fp8ref.forward(x, idx, p, w1, w2)
    some = torch.tensor([0, 3, 17, 39])
    torch.testing.assert_close(fp8ref.forward(x[some], idx[some], p[some], w1, w2), y[some], rtol=1e-6, atol=1e-7)


def test_reference_is_the_naive_moe_up_to_the_quantisation():
    """The reference computes naive's function (close to it, by e4m3's error) and with float64 inputs its forward is
    the naive loop over fake-quantised operands (same per-row scales) to float64 precision."""
    x, idx, p, w1, w2 = moe_inputs(dtype=torch.float64)
    y = fp8ref.forward(x, idx, p, w1, w2)
    assert 0.01 < metrics.rel_err(y, naive.forward(x, idx, p, w1, w2)) < 0.12
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            g_F, u_F = (quant.fake_quant(x[t:t + 1], -1) @ quant.fake_quant(w1[e], -2)).chunk(2, dim=-1)
            a_F = torch.nn.functional.silu(g_F) * u_F
            want[t] += p[t, k] * (quant.fake_quant(a_F, -1) @ quant.fake_quant(w2[e], -2))[0]
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_fp8bwd_quantises_the_backward_gemms_over_their_reduced_dims():
    """"fp8-rowwise-fp8bwd": dA = q(dY, rows) @ q(B, rows)^T (reduced dim M), dB = q(A, columns)^T @ q(dY, columns)
    (reduced dim N: the rows of this call, one expert's group); not the straight-through gradients."""
    g = torch.Generator().manual_seed(10)
    a = (torch.randn(24, 40, generator=g) * torch.logspace(-1, 1, 24).unsqueeze(-1)).requires_grad_()
    b = (torch.randn(40, 56, generator=g) / 6).requires_grad_()
    dy = torch.randn(24, 56, generator=g) * torch.logspace(1, -1, 56)
    quant.fp8_matmul(a, b, "fp8-rowwise-fp8bwd").backward(dy)
    a0, b0 = a.detach(), b.detach()
    fq = quant.fake_quant
    torch.testing.assert_close(a.grad, fq(dy, -1) @ fq(b0, -1).t())
    torch.testing.assert_close(b.grad, fq(a0, -2).t() @ fq(dy, -2))
    assert 0.01 < metrics.rel_err(a.grad, dy @ b0.t()) < 0.1 and 0.01 < metrics.rel_err(b.grad, a0.t() @ dy) < 0.1
    with pytest.raises(ValueError, match="gemm_dtype 'fp8' is not one of fp8-rowwise, fp8-rowwise-fp8bwd"):
        quant.fp8_matmul(a0, b0, "fp8")
