"""Triton kernels of the dropless SwiGLU expert block (forward and backward).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
Rows are (token, expert) slots in expert-sorted order: sorted row r reads token tok_S[r], is slot
order_S[r] (= t*K + k), belongs to expert e with starts_E[e] <= r < ends_E[e], and has the k-major output row
orow_S[r] = k*T + t (rows_gemm scatters there, so the per-token sum over k runs over the outermost dim).
Row-tiled kernels run over a block schedule: program tile m covers rows tile_r0[m] .. +BM of expert
tile_e[m] (-1 marks a spare tile of the fixed-size grid, which exits at once).

Kernels (all accumulate in fp32; PREC is tl.dot's input_precision, "ieee" for fp32 inputs;
UPCAST is set under the interpreter only, see _dot):
  gate_up   a_SF = silu(x[tok] @ Wg) * (x[tok] @ Wu)          gather fused into the A load; SwiGLU epilogue
  gate_up_tma  the same from xs_SD = x[tok] already in sorted-row order, both operands by tensor descriptor
  rows_gemm out = A_rows @ B_e, optionally A rows gathered (x/dy[tok]), times p, stored at k-major rows:
            down (a_SF @ W2 * p), dX (dH_SF2 @ W1^T); dA' (dy[tok] @ W2^T, sorted rows, not scattered)
  rows_gemm_tma  rows_gemm for A in sorted-row order, both operands by tensor descriptor
  swiglu_bwd elementwise SwiGLU backward from saved h and dA' (recompute=100 path)
  schedule  the block schedule (tile -> expert, first row) on the device
  bwd_act   fused dA' = dy[tok] @ W2^T and recomputed g,u = x[tok] @ W1 in the same D loop (recompute=0);
            epilogue: dp partial sums, dH_SF2 = [dg | du], ap_SF = p * a
  wgrad     out_e = A_e^T @ B_e over expert e's rows (dW1: A = x[tok], B = dH; dW2: A = ap, B = dy[tok])
Columns of the non-reduced dims are clamped in range (cols % N) when N is not a multiple of the block
(EVEN_N false) and masked at the store; the reduced dim is masked when it is not a multiple of BK.
"""
import os

import triton
import triton.language as tl

# Small helpers are plain Python under the interpreter (it re-patches triton.language on every call of a
# jit'd helper, which made the CPU tests 3x slower) and jit'd device functions otherwise.
_helper = (lambda fn: fn) if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else triton.jit


@_helper
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@_helper
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter's dot multiplies 16-bit floats as raw integers, so under the interpreter 16-bit
    # operands go through an fp32 dot (the same products: bf16 x bf16 is exact in fp32)
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@_helper
def _cols(pid_n, N, BN: tl.constexpr, EVEN_N: tl.constexpr):
    cols = pid_n * BN + tl.arange(0, BN)
    if EVEN_N:
        cols_ld = cols
    else:
        cols_ld = cols % N
    return cols, cols_ld


@_helper
def _copy_rows(src_ptr, src_rows, dst_ptr, dst_rows, row_ok, ncols, stride_src, stride_dst,
               BM: tl.constexpr, BK: tl.constexpr):
    """dst[dst_rows] = src[src_rows] over all ncols columns: the gathered operand written out in sorted-row
    order by one program per row tile (a memory pass that overlaps the other programs' GEMM work)."""
    for c0 in range(0, ncols, BK):
        cs = c0 + tl.arange(0, BK)
        ok = row_ok[:, None] & (cs < ncols)[None, :]
        v = tl.load(src_ptr + src_rows[:, None] * stride_src + cs[None, :], mask=ok, other=0.0)
        tl.store(dst_ptr + dst_rows[:, None] * stride_dst + cs[None, :], v, mask=ok)


@_helper
def _swiglu_store(acc_g, acc_u, rows, row_ok, cols, F, a_ptr, h_ptr, stride_a, stride_h, SAVE_H: tl.constexpr):
    """gate_up's epilogue: a = silu(g) * u at (rows, cols), and h = [g | u] when SAVE_H; cols >= F masked."""
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    rows64 = rows.to(tl.int64)
    out_ok = row_ok[:, None] & (cols < F)[None, :]
    tl.store(a_ptr + rows64[:, None] * stride_a + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_ok)
    if SAVE_H:
        h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=out_ok)
        tl.store(h_ptrs + F, acc_u.to(h_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def gate_up_kernel(x_ptr, w1_ptr, w1_desc, tok_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr, a_ptr, h_ptr, xs_ptr,
                   D, F, n_tiles_m, stride_x, stride_w1e, stride_w1d, stride_a, stride_h, stride_xs,
                   SAVE_H: tl.constexpr, SAVE_X: tl.constexpr, W_DESC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    rows = tl.load(tile_r0_ptr + pid_m) + tl.arange(0, BM)
    row_ok = rows < tl.load(ends_ptr + e)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if SAVE_X:
        if pid_n == 0:
            _copy_rows(x_ptr, tok, xs_ptr, rows.to(tl.int64), row_ok, D, stride_x, stride_xs, BM, BK)
    cols, cols_ld = _cols(pid_n, F, BN, EVEN_N)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    wg_ptrs = w1_ptr + e.to(tl.int64) * stride_w1e + ks[:, None] * stride_w1d + cols_ld[None, :]
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if W_DESC:  # weights by tensor descriptor over W1 as (E*D, 2F); needs D % BK == 0
            xt = tl.load(x_ptrs)
            wg = w1_desc.load([e * D + k0, pid_n * BN])
            wu = w1_desc.load([e * D + k0, F + pid_n * BN])
        elif EVEN_K:
            xt = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wg_ptrs + F)
        else:
            k_ok = ks < D - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(wg_ptrs + F, mask=k_ok[:, None], other=0.0)
        acc_g = _dot(xt, wg, acc_g, PREC, UPCAST)
        acc_u = _dot(xt, wu, acc_u, PREC, UPCAST)
        x_ptrs += BK
        wg_ptrs += BK * stride_w1d
    _swiglu_store(acc_g, acc_u, rows, row_ok, cols, F, a_ptr, h_ptr, stride_a, stride_h, SAVE_H)


@triton.jit
def gate_up_tma_kernel(xs_desc, w1_desc, tile_e_ptr, tile_r0_ptr, ends_ptr, a_ptr, h_ptr,
                       D, F, n_tiles_m, stride_a, stride_h,
                       SAVE_H: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """gate_up_kernel for x rows already in sorted-row order (xs_SD = x[tok]): both operands by tensor
    descriptor (TMA on Hopper). xs_desc: (S x D); w1_desc: W1 as (E*D x 2F). Needs D % BK == 0. Rows past the
    expert's end and columns past F (the up half, or zero past the tensor) reach only masked-out outputs."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    r0 = tl.load(tile_r0_ptr + pid_m)
    rows = r0 + tl.arange(0, BM)
    row_ok = rows < tl.load(ends_ptr + e)
    cols = pid_n * BN + tl.arange(0, BN)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        xt = xs_desc.load([r0, k0])
        wg = w1_desc.load([e * D + k0, pid_n * BN])
        wu = w1_desc.load([e * D + k0, F + pid_n * BN])
        acc_g = _dot(xt, wg, acc_g, PREC, UPCAST)
        acc_u = _dot(xt, wu, acc_u, PREC, UPCAST)
    _swiglu_store(acc_g, acc_u, rows, row_ok, cols, F, a_ptr, h_ptr, stride_a, stride_h, SAVE_H)


@triton.jit
def rows_gemm_kernel(a_ptr, b_ptr, b_desc, tok_ptr, orow_ptr, p_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr, out_ptr,
                     as_ptr, N, Kdim, n_tiles_m, stride_a, stride_be, stride_bk, stride_bn, stride_out, stride_as,
                     GATHER_A: tl.constexpr, SAVE_A: tl.constexpr, B_DESC: tl.constexpr, TRANS_B: tl.constexpr, SCATTER: tl.constexpr, SCALE_P: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(N, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    end = tl.load(ends_ptr + e)
    rows = tl.load(tile_r0_ptr + pid_m) + tl.arange(0, BM)
    row_ok = rows < end
    if GATHER_A:  # A rows are tokens: a = x or dy, row r reads token tok_S[r]
        rows_ld = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        if SAVE_A:
            if pid_n == 0:
                _copy_rows(a_ptr, rows_ld, as_ptr, rows.to(tl.int64), row_ok, Kdim, stride_a, stride_as, BM, BK)
    else:
        rows_ld = tl.minimum(rows, end - 1).to(tl.int64)
    cols, cols_ld = _cols(pid_n, N, BN, EVEN_N)
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols_ld[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kdim, BK):
        if B_DESC:  # B by tensor descriptor, as in rows_gemm_tma_kernel; needs Kdim % BK == 0
            at = tl.load(a_ptrs)
            if TRANS_B:
                bt = b_desc.load([e * N + pid_n * BN, k0]).T
            else:
                bt = b_desc.load([e * Kdim + k0, pid_n * BN])
        elif EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            k_ok = ks < Kdim - k0
            at = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _dot(at, bt, acc, PREC, UPCAST)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    if SCATTER or SCALE_P:
        orow = tl.load(orow_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if SCALE_P:  # p in the same k-major order as the output rows
        acc = acc * tl.load(p_ptr + orow, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:  # output row k*T + t (k-major): the sum over k is then over the outermost dim
        out_rows = orow
    else:
        out_rows = rows.to(tl.int64)
    out_ok = row_ok[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + out_rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_ok)


@triton.jit
def swiglu_bwd_kernel(h_ptr, da_ptr, order_ptr, p_ptr, dh_ptr, ap_ptr, dp_ptr,
                      S, F, stride_h, stride_da, stride_dh, stride_ap, BR: tl.constexpr, BF: tl.constexpr):
    """From h = [g | u] and dA' = dy[tok] @ W2^T (sorted rows): dH = [dg | du] with dA = p * dA',
    ap = p * silu(g) * u, and dp[slot] = sum_f silu(g) u dA' (a whole row per program: no partial sums)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < S
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    p = tl.load(p_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    dp = tl.zeros((BR,), dtype=tl.float32)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        ok = row_ok[:, None] & (cols < F)[None, :]
        h_ptrs = h_ptr + rows64 * stride_h + cols[None, :]
        g = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_ptrs + F, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + rows64 * stride_da + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        act = silu * u
        dp += tl.sum(act * da, axis=1)
        dap = da * p
        dh_ptrs = dh_ptr + rows64 * stride_dh + cols[None, :]
        tl.store(dh_ptrs, (dap * u * sig * (1.0 + g * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptrs + F, (dap * silu).to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(ap_ptr + rows64 * stride_ap + cols[None, :], (act * p).to(ap_ptr.dtype.element_ty), mask=ok)
    tl.store(dp_ptr + slot, dp, mask=row_ok)


@triton.jit
def schedule_kernel(starts_ptr, ends_ptr, tile_e_ptr, tile_r0_ptr, E, n_tiles,
                    BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block schedule: tile t -> (expert, first row) for ceil(count_e / BM) tiles per expert; -1 = spare."""
    es = tl.arange(0, BLOCK_E)
    e_ok = es < E
    start = tl.load(starts_ptr + es, mask=e_ok, other=0)
    tiles = (tl.load(ends_ptr + es, mask=e_ok, other=0) - start + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_of_t = tl.sum(((tile_end[None, :] <= t[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
    mine = (es[None, :] == e_of_t[:, None])
    r0 = tl.sum(tl.where(mine, start[None, :] + (t[:, None] - (tile_end - tiles)[None, :]) * BM, 0), axis=1)
    t_ok = t < n_tiles
    tl.store(tile_e_ptr + t, tl.where(e_of_t < E, e_of_t, -1), mask=t_ok)
    tl.store(tile_r0_ptr + t, r0, mask=t_ok)


@triton.jit
def bwd_act_kernel(dy_ptr, x_ptr, w1_ptr, w2_ptr, tok_ptr, order_ptr, p_ptr,
                   tile_e_ptr, tile_r0_ptr, ends_ptr, dh_ptr, ap_ptr, dp_ptr,
                   D, F, n_tiles_m, stride_dy, stride_x, stride_w1e, stride_w1d, stride_w2e, stride_w2f,
                   stride_dh, stride_ap, stride_dp,
                   EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """recompute=0: dA' = dy[tok] @ W2^T and g, u = x[tok] @ [Wg | Wu] in one D loop (three accumulators in
    the same layout), then the SwiGLU backward in the epilogue; dp as per-column-block partial sums."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    end = tl.load(ends_ptr + e)
    rows = tl.load(tile_r0_ptr + pid_m) + tl.arange(0, BM)
    row_ok = rows < end
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols, cols_ld = _cols(pid_n, F, BN, EVEN_N)
    ks = tl.arange(0, BK)
    e64 = e.to(tl.int64)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dy + ks[None, :]
    w2t_ptrs = w2_ptr + e64 * stride_w2e + cols_ld[None, :] * stride_w2f + ks[:, None]   # [k, n] = W2[e, n, k]
    x_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    wg_ptrs = w1_ptr + e64 * stride_w1e + ks[:, None] * stride_w1d + cols_ld[None, :]
    acc_da = tl.zeros((BM, BN), dtype=tl.float32)
    g = tl.zeros((BM, BN), dtype=tl.float32)
    u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if EVEN_K:
            dyt = tl.load(dy_ptrs)
            w2t = tl.load(w2t_ptrs)
            xt = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wg_ptrs + F)
        else:
            k_ok = ks < D - k0
            dyt = tl.load(dy_ptrs, mask=k_ok[None, :], other=0.0)
            w2t = tl.load(w2t_ptrs, mask=k_ok[:, None], other=0.0)
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(wg_ptrs + F, mask=k_ok[:, None], other=0.0)
        acc_da = _dot(dyt, w2t, acc_da, PREC, UPCAST)
        g = _dot(xt, wg, g, PREC, UPCAST)
        u = _dot(xt, wu, u, PREC, UPCAST)
        dy_ptrs += BK
        w2t_ptrs += BK
        x_ptrs += BK
        wg_ptrs += BK * stride_w1d
    sig = tl.sigmoid(g)
    silu = g * sig
    act = silu * u
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    p = tl.load(p_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    col_ok = cols < F
    dp_part = tl.sum(tl.where(col_ok[None, :], act * acc_da, 0.0), axis=1)
    tl.store(dp_ptr + slot * stride_dp + pid_n, dp_part, mask=row_ok)
    dap = acc_da * p[:, None]
    out_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
    tl.store(dh_ptrs, (dap * u * sig * (1.0 + g * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dh_ptrs + F, (dap * silu).to(dh_ptr.dtype.element_ty), mask=out_ok)
    tl.store(ap_ptr + rows64[:, None] * stride_ap + cols[None, :], (act * p[:, None]).to(ap_ptr.dtype.element_ty),
             mask=out_ok)


@triton.jit
def wgrad_kernel(a_ptr, b_ptr, tok_ptr, starts_ptr, ends_ptr, out_ptr,
                 M, N, stride_ar, stride_am, stride_br, stride_bn, stride_oe, stride_om, stride_on,
                 GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """out_e[m, n] = sum over expert e's sorted rows r of A[r, m] * B[r, n]; A[r, m] sits at
    r * stride_ar + m * stride_am (row r -> token tok_S[r] when GATHER_A), B likewise."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    pid_m, pid_n = _grouped_pid(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    ms, ms_ld = _cols(pid_m, M, BM, EVEN_M)
    ns, ns_ld = _cols(pid_n, N, BN, EVEN_N)
    a_cols = a_ptr + ms_ld.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + ns_ld.to(tl.int64)[None, :] * stride_bn
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    r = start + ks
    n_full = (end - start) // BK
    for _ in range(n_full):
        if GATHER_A:
            ra = tl.load(tok_ptr + r).to(tl.int64)
        else:
            ra = r.to(tl.int64)
        if GATHER_B:
            rb = tl.load(tok_ptr + r).to(tl.int64)
        else:
            rb = r.to(tl.int64)
        at = tl.load(a_cols + ra[None, :] * stride_ar)   # (BM, BK) = A_rows^T
        bt = tl.load(b_cols + rb[:, None] * stride_br)   # (BK, BN)
        acc = _dot(at, bt, acc, PREC, UPCAST)
        r += BK
    if start + n_full * BK < end:
        r_ok = r < end
        r_ld = tl.minimum(r, end - 1)
        if GATHER_A:
            ra = tl.load(tok_ptr + r_ld).to(tl.int64)
        else:
            ra = r_ld.to(tl.int64)
        if GATHER_B:
            rb = tl.load(tok_ptr + r_ld).to(tl.int64)
        else:
            rb = r_ld.to(tl.int64)
        at = tl.load(a_cols + ra[None, :] * stride_ar, mask=r_ok[None, :], other=0.0)
        bt = tl.load(b_cols + rb[:, None] * stride_br, mask=r_ok[:, None], other=0.0)
        acc = _dot(at, bt, acc, PREC, UPCAST)
    out_ok = (ms < M)[:, None] & (ns < N)[None, :]
    out_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + ms.to(tl.int64)[:, None] * stride_om
                + ns.to(tl.int64)[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def wgrad_tma_kernel(a_ptr, a_desc, b_ptr, b_desc, tok_ptr, starts_ptr, ends_ptr, out_ptr,
                     M, N, stride_ar, stride_br, stride_oe, stride_om, stride_on,
                     GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """wgrad_kernel with the operand that is not gathered read by tensor descriptor (TMA on Hopper): it is
    stored row-major (rows x M or rows x N, unit column stride) in sorted-row order. Rows past the expert's end
    are zeroed in one operand only (the gathered one, or A when neither is), which zeroes their products."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    pid_m, pid_n = _grouped_pid(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    ms, ms_ld = _cols(pid_m, M, BM, EVEN_M)
    ns, ns_ld = _cols(pid_n, N, BN, EVEN_N)
    a_cols = a_ptr + ms_ld.to(tl.int64)[:, None]
    b_cols = b_ptr + ns_ld.to(tl.int64)[None, :]
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n_full = (end - start) // BK
    r0 = start
    for _ in range(n_full):
        if GATHER_A:
            ra = tl.load(tok_ptr + r0 + ks).to(tl.int64)
            at = tl.load(a_cols + ra[None, :] * stride_ar)        # (BM, BK)
        else:
            at = a_desc.load([r0, pid_m * BM]).T                  # (BK, BM) -> (BM, BK)
        if GATHER_B:
            rb = tl.load(tok_ptr + r0 + ks).to(tl.int64)
            bt = tl.load(b_cols + rb[:, None] * stride_br)        # (BK, BN)
        else:
            bt = b_desc.load([r0, pid_n * BN])
        acc = _dot(at, bt, acc, PREC, UPCAST)
        r0 += BK
    if r0 < end:
        r_ok = r0 + ks < end
        r_ld = tl.minimum(r0 + ks, end - 1)
        if GATHER_A:
            ra = tl.load(tok_ptr + r_ld).to(tl.int64)
            at = tl.load(a_cols + ra[None, :] * stride_ar, mask=r_ok[None, :], other=0.0)
        else:
            at = a_desc.load([r0, pid_m * BM]).T
            if not GATHER_B:
                at = tl.where(r_ok[None, :], at, tl.zeros_like(at))
        if GATHER_B:
            rb = tl.load(tok_ptr + r_ld).to(tl.int64)
            bt = tl.load(b_cols + rb[:, None] * stride_br, mask=r_ok[:, None], other=0.0)
        else:
            bt = b_desc.load([r0, pid_n * BN])
        acc = _dot(at, bt, acc, PREC, UPCAST)
    out_ok = (ms < M)[:, None] & (ns < N)[None, :]
    out_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + ms.to(tl.int64)[:, None] * stride_om
                + ns.to(tl.int64)[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def rows_gemm_tma_kernel(a_desc, b_desc, orow_ptr, p_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr, out_ptr,
                         N, Kdim, n_tiles_m, stride_out,
                         TRANS_B: tl.constexpr, SCATTER: tl.constexpr, SCALE_P: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """rows_gemm for A in sorted-row order (not gathered), both operands by tensor descriptor (TMA on Hopper).
    a_desc: A (S x Kdim); b_desc: the weights as one 2-D view, (E*Kdim x N), or (E*N x Kdim) when TRANS_B.
    Needs Kdim % BK == 0. Rows past the expert's end (read from the next expert) and columns past N (read
    from the next expert's block, or zero past the tensor) only reach outputs that the store masks."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(N, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    end = tl.load(ends_ptr + e)
    r0 = tl.load(tile_r0_ptr + pid_m)
    rows = r0 + tl.arange(0, BM)
    row_ok = rows < end
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kdim, BK):
        at = a_desc.load([r0, k0])
        if TRANS_B:
            bt = b_desc.load([e * N + pid_n * BN, k0]).T
        else:
            bt = b_desc.load([e * Kdim + k0, pid_n * BN])
        acc = _dot(at, bt, acc, PREC, UPCAST)
    if SCATTER or SCALE_P:
        orow = tl.load(orow_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if SCALE_P:
        acc = acc * tl.load(p_ptr + orow, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        out_rows = orow
    else:
        out_rows = rows.to(tl.int64)
    out_ok = row_ok[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + out_rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_ok)
