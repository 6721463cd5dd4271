"""Triton kernels of the dropless SwiGLU expert block (forward and backward).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
Rows are (token, expert) slots in expert-sorted order: sorted row r reads token tok_S[r], is slot
order_S[r] (= t*K + k) and belongs to expert e with starts_E[e] <= r < ends_E[e].
Row-tiled kernels run over a block schedule: program tile m covers rows tile_r0[m] .. +BM of expert
tile_e[m] (-1 marks a spare tile of the fixed-size grid, which exits at once).

Kernels (all accumulate in fp32; PREC is tl.dot's input_precision, "ieee" for fp32 inputs):
  gate_up   a_SF = silu(x[tok] @ Wg) * (x[tok] @ Wu)          gather fused into the A load; SwiGLU epilogue
  rows_gemm out[order] = (A_rows @ B_e) * p[order]             down projection (A = a_SF, B = W2) or
                                                               dX (A = dH_SF2, B = W1^T), stored in slot order
  bwd_act   dA' = dy[tok] @ W2^T (+ recompute g,u = x[tok] @ W1 in the same D loop);
            epilogue: dp partial sums, dH_SF2 = [dg | du], ap_SF = p * a
  wgrad     out_e = A_e^T @ B_e over expert e's rows (dW1: A = x[tok], B = dH; dW2: A = ap, B = dy[tok])
Columns of the non-reduced dims are clamped in range (cols % N) when N is not a multiple of the block
(EVEN_N false) and masked at the store; the reduced dim is masked when it is not a multiple of BK.
"""
import triton
import triton.language as tl


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _cols(pid_n, N, BN: tl.constexpr, EVEN_N: tl.constexpr):
    cols = pid_n * BN + tl.arange(0, BN)
    if EVEN_N:
        cols_ld = cols
    else:
        cols_ld = cols % N
    return cols, cols_ld


@triton.jit
def gate_up_kernel(x_ptr, w1_ptr, tok_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr, a_ptr, h_ptr,
                   D, F, n_tiles_m, stride_x, stride_w1e, stride_w1d, stride_a, stride_h,
                   SAVE_H: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    rows = tl.load(tile_r0_ptr + pid_m) + tl.arange(0, BM)
    row_ok = rows < tl.load(ends_ptr + e)
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols, cols_ld = _cols(pid_n, F, BN, EVEN_N)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    wg_ptrs = w1_ptr + e.to(tl.int64) * stride_w1e + ks[:, None] * stride_w1d + cols_ld[None, :]
    wu_ptrs = wg_ptrs + F
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_ok = ks < D - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
        x_ptrs += BK
        wg_ptrs += BK * stride_w1d
        wu_ptrs += BK * stride_w1d
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    rows64 = rows.to(tl.int64)
    out_ok = row_ok[:, None] & (cols < F)[None, :]
    tl.store(a_ptr + rows64[:, None] * stride_a + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_ok)
    if SAVE_H:
        h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=out_ok)
        tl.store(h_ptrs + F, acc_u.to(h_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def rows_gemm_kernel(a_ptr, b_ptr, order_ptr, p_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr, out_ptr,
                     N, Kdim, n_tiles_m, stride_a, stride_be, stride_bk, stride_bn, stride_out,
                     SCALE_P: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles_m, tl.cdiv(N, BN), GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    end = tl.load(ends_ptr + e)
    rows = tl.load(tile_r0_ptr + pid_m) + tl.arange(0, BM)
    row_ok = rows < end
    rows_ld = tl.minimum(rows, end - 1).to(tl.int64)
    cols, cols_ld = _cols(pid_n, N, BN, EVEN_N)
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols_ld[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kdim, BK):
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            k_ok = ks < Kdim - k0
            at = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if SCALE_P:
        acc = acc * tl.load(p_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ok = row_ok[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + slot[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def bwd_act_kernel(dy_ptr, x_ptr, w1_ptr, w2_ptr, h_ptr, tok_ptr, order_ptr, p_ptr,
                   tile_e_ptr, tile_r0_ptr, ends_ptr, dh_ptr, ap_ptr, dp_ptr,
                   D, F, n_tiles_m, stride_dy, stride_x, stride_w1e, stride_w1d, stride_w2e, stride_w2f,
                   stride_h, stride_dh, stride_ap, stride_dp,
                   RECOMPUTE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
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
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if EVEN_K:
            dyt = tl.load(dy_ptrs)
            w2t = tl.load(w2t_ptrs)
        else:
            k_ok = ks < D - k0
            dyt = tl.load(dy_ptrs, mask=k_ok[None, :], other=0.0)
            w2t = tl.load(w2t_ptrs, mask=k_ok[:, None], other=0.0)
        acc_da = tl.dot(dyt, w2t, acc_da, input_precision=PREC)
        dy_ptrs += BK
        w2t_ptrs += BK
        if RECOMPUTE:
            if EVEN_K:
                xt = tl.load(x_ptrs)
                wg = tl.load(wg_ptrs)
                wu = tl.load(wg_ptrs + F)
            else:
                xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
                wu = tl.load(wg_ptrs + F, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
            x_ptrs += BK
            wg_ptrs += BK * stride_w1d
    rows64 = rows.to(tl.int64)
    if RECOMPUTE:
        g = acc_g
        u = acc_u
    else:
        h_ptrs = h_ptr + tl.minimum(rows, end - 1).to(tl.int64)[:, None] * stride_h + cols_ld[None, :]
        g = tl.load(h_ptrs).to(tl.float32)
        u = tl.load(h_ptrs + F).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    act = silu * u
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    p = tl.load(p_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    col_ok = cols < F
    dp_part = tl.sum(tl.where(col_ok[None, :], act * acc_da, 0.0), axis=1)
    tl.store(dp_ptr + slot * stride_dp + pid_n, dp_part, mask=row_ok)
    dap = acc_da * p[:, None]
    du = dap * silu
    dg = dap * u * sig * (1.0 + g * (1.0 - sig))
    out_ok = row_ok[:, None] & col_ok[None, :]
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
    tl.store(dh_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dh_ptrs + F, du.to(dh_ptr.dtype.element_ty), mask=out_ok)
    ap = act * p[:, None]
    tl.store(ap_ptr + rows64[:, None] * stride_ap + cols[None, :], ap.to(ap_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def wgrad_kernel(a_ptr, b_ptr, tok_ptr, starts_ptr, ends_ptr, out_ptr,
                 M, N, stride_a, stride_b, stride_oe, stride_om,
                 GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    pid_m, pid_n = _grouped_pid(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    ms, ms_ld = _cols(pid_m, M, BM, EVEN_M)
    ns, ns_ld = _cols(pid_n, N, BN, EVEN_N)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    r = start + ks
    n_full = (end - start) // BK
    for _ in range(0, n_full):
        if GATHER_A:
            ra = tl.load(tok_ptr + r).to(tl.int64)
        else:
            ra = r.to(tl.int64)
        if GATHER_B:
            rb = tl.load(tok_ptr + r).to(tl.int64)
        else:
            rb = r.to(tl.int64)
        at = tl.load(a_ptr + ra[None, :] * stride_a + ms_ld[:, None])   # (BM, BK) = A_rows^T
        bt = tl.load(b_ptr + rb[:, None] * stride_b + ns_ld[None, :])   # (BK, BN)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
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
        at = tl.load(a_ptr + ra[None, :] * stride_a + ms_ld[:, None], mask=r_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + rb[:, None] * stride_b + ns_ld[None, :], mask=r_ok[:, None], other=0.0)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
    out_ok = (ms < M)[:, None] & (ns < N)[None, :]
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ms[:, None].to(tl.int64) * stride_om + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
