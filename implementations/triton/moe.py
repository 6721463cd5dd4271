"""Host side of the Triton expert block: routing metadata, launchers, the autograd Function.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots (slot s = t*K + k).
Forward:  sort slots by expert (device, no host sync) -> gate_up (gather x rows, SwiGLU epilogue) -> a_SF
          -> rows_gemm (a @ W2, times p, stored at k-major rows k*T + t) -> o_SD -> y_TD = o.view(K, T, D).sum(0).
          (recompute=100 training with F >= PREGATHER_MIN_F: x[tok] copied to sorted order first -> gate_up_tma)
Backward: recompute=100: rows_gemm dA' = dy[tok] @ W2^T (pre-gathered likewise), swiglu_bwd(h, dA') -> dH_SF2,
          ap_SF = p*a, dp;
          recompute=0: bwd_act (dA' and recomputed g,u = x[tok] @ W1 in one D loop, SwiGLU grad epilogue)
          -> wgrad dW2 = ap^T dy[tok] -> rows_gemm dX_s = dH @ W1^T at k-major rows, summed over K
          -> wgrad dW1 = x[tok]^T dH.
recompute=100 keeps h_SF2 = [x W_g | x W_u] from the forward; recompute=0 keeps only the inputs and
recomputes g,u inside bwd_act's D loop (2*S*D*2F more GEMM flops; no S x 2F tensor kept or made).

Forward and backward are two PyTorch custom ops (moebench::triton_experts_fwd / _bwd) with fake (meta)
implementations and an autograd formula, so torch.compile traces a model that uses them without a graph break
(they stay opaque calls in its graph) and CUDA-graph capture records their kernels like any other. The forward
returns what the backward needs (h, x[tok], the expert-sorted routing) as outputs; empty tensors stand for
"not kept".
"""
from __future__ import annotations

import torch

from implementations.triton import tuning


def kernels(interpret: bool):
    """The kernels module. On CPU the kernels only run under Triton's interpreter, which must be switched on
    (TRITON_INTERPRET=1) before triton itself is imported: its standard library is decorated at import."""
    from implementations.triton import kernels as mod
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(mod.gate_up_kernel, InterpretedFunction):
            raise RuntimeError("triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return mod


PREGATHER_MIN_F = 2048
POISON = False  # tests: fill every new buffer with NaN, so an element a kernel fails to write shows up


def _empty(like: torch.Tensor, *shape) -> torch.Tensor:
    out = like.new_empty(shape)
    return out.fill_(float("nan")) if POISON else out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Routing:
    """Expert-sorted slot metadata, all on the device, built without a host sync."""

    def __init__(self, idx_TK: torch.Tensor | None, E: int, kn, saved: tuple | None = None, T: int = 0, K: int = 0):
        """From idx_TK, or (backward) from the tensors() a forward returned, with T and K."""
        if saved is not None:
            self.T, self.K = T, K
            self.order_S, self.tok_S, self.orow_S, self.starts_E, self.ends_E = saved
        else:
            self.T, self.K = idx_TK.shape
            sorted_S, order_S = torch.sort(idx_TK.reshape(-1), stable=True)
            experts_E = torch.arange(E, device=idx_TK.device, dtype=sorted_S.dtype)
            self.starts_E = torch.searchsorted(sorted_S, experts_E, out_int32=True)
            self.ends_E = torch.searchsorted(sorted_S, experts_E, right=True, out_int32=True)
            self.order_S = order_S.to(torch.int32)                                  # sorted row -> slot
            self.tok_S = torch.div(self.order_S, self.K, rounding_mode="floor")   # sorted row -> token
            # sorted row -> k-major output row k*T + t (down and dX scatter there; p_KT is indexed by it too)
            self.orow_S = (self.tok_S.clone() if self.K == 1
                           else (self.order_S - self.tok_S * self.K) * self.T + self.tok_S)
        self.E, self.S, self.kn = E, self.T * self.K, kn
        self._sched: dict[int, tuple] = {}

    def tensors(self) -> tuple:
        return self.order_S, self.tok_S, self.orow_S, self.starts_E, self.ends_E

    def schedule(self, BM: int):
        """(tile_e, tile_r0, n_tiles): row tiles of BM rows per expert, padded to a fixed count (-1 = spare)."""
        if BM not in self._sched:
            n = _cdiv(self.S, BM) + self.E
            tile_e = torch.empty(n, device=self.order_S.device, dtype=torch.int32)
            tile_r0 = torch.empty_like(tile_e)
            BLOCK_T = 64
            self.kn.schedule_kernel[(_cdiv(n, BLOCK_T),)](
                self.starts_E, self.ends_E, tile_e, tile_r0, self.E, n,
                BM=BM, BLOCK_E=max(16, 1 << (self.E - 1).bit_length()), BLOCK_T=BLOCK_T)
            self._sched[BM] = (tile_e, tile_r0, n)
        return self._sched[BM]


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _desc(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def _opts(cfg):
    return {"BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK, "GROUP_M": cfg.GROUP_M, "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages}


def uses_tma(x_TD, D: int, F: int) -> bool:
    """The tensor-descriptor (TMA) kernels: on Hopper or newer (or the interpreter), with D and F multiples of 64
    (the padding gives that) so that every K step is a full block and every row stride is 16-byte aligned."""
    cap_ok = not x_TD.is_cuda or torch.cuda.get_device_capability(x_TD.device)[0] >= 9
    return cap_ok and D % 64 == 0 and F % 64 == 0


PREGATHER = ("auto", "on", "off")


class Launcher:
    """One expert-block problem (shapes, dtype, routing, kernels) and a launcher per kernel. Options (backend
    options of `triton`, so they are in the case key): wdesc, pregather (see below)."""

    def __init__(self, x_TD, w1_EDF2, R: Routing, wdesc: bool = True, pregather: str = "auto"):
        self.interpret = not x_TD.is_cuda
        self.kn = R.kn
        self.R = R
        self.E, self.D, F2 = w1_EDF2.shape
        self.F = F2 // 2
        self.dtype = x_TD.dtype
        self.prec = _prec(x_TD.dtype)
        self.upcast = self.interpret and x_TD.dtype != torch.float32
        self.key = (self.D, self.F, self.E, R.K, tuning.token_bucket(R.T), str(x_TD.dtype).split(".")[-1])
        self.tma = uses_tma(x_TD, self.D, self.F)
        # the kernels that gather A rows (gate_up, dA') read their weights by descriptor too, unless wdesc=False
        # (an A/B switch for benchmarks; both paths are tested)
        self.wdesc = self.tma and wdesc
        # recompute=100 training: x[tok] and dy[tok] are copied to sorted-row order first (torch index_select),
        # and gate_up and dA' read them by descriptor, when F >= PREGATHER_MIN_F (the copy costs S*D, the GEMM
        # time it saves grows with F: on the H100 a 1 ms gain at F=14336, a wash at F <= 1408); otherwise those two
        # GEMMs gather themselves and their first column-tile programs write the sorted copies for the dW GEMMs.
        # pregather = on / off forces either way (A/B runs; both paths are tested).
        if pregather not in PREGATHER:
            raise ValueError(f"triton: pregather must be one of {', '.join(PREGATHER)}, got {pregather!r}")
        self.pregather = self.tma and (pregather == "on" or (pregather == "auto" and self.F >= PREGATHER_MIN_F))

    def _run(self, kind, variant, launch):
        cfg = tuning.pick(kind, self.key + variant, launch, self.interpret, self.dtype == torch.float32)
        launch(cfg)
        return cfg

    def gate_up(self, x_TD, w1_EDF2, save_h: bool, save_x: bool = False):
        """a_SF (and h_SF2 when save_h; xs_SD = x[tok] in sorted-row order when save_x)."""
        R, D, F = self.R, self.D, self.F
        a_SF = _empty(x_TD, R.S, F)
        h_SF2 = _empty(x_TD, R.S, 2 * F) if save_h else a_SF
        xs_SD = _empty(x_TD, R.S, D) if save_x else a_SF

        w_desc = self.wdesc

        def launch(cfg):
            tile_e, tile_r0, n = R.schedule(cfg.BM)
            desc = _desc(w1_EDF2.view(self.E * D, 2 * F), [cfg.BK, cfg.BN]) if w_desc else None
            self.kn.gate_up_kernel[(n * _cdiv(F, cfg.BN),)](
                x_TD, w1_EDF2, desc, R.tok_S, tile_e, tile_r0, R.ends_E, a_SF, h_SF2, xs_SD,
                D, F, n, x_TD.stride(0), w1_EDF2.stride(0), w1_EDF2.stride(1), a_SF.stride(0), h_SF2.stride(0),
                xs_SD.stride(0), SAVE_H=save_h, SAVE_X=save_x, W_DESC=w_desc, EVEN_K=D % cfg.BK == 0, EVEN_N=F % cfg.BN == 0, PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run("gate_up", (save_h, save_x, w_desc), launch)
        return a_SF, (h_SF2 if save_h else None), (xs_SD if save_x else None)

    def gate_up_sorted(self, xs_SD, w1_EDF2, save_h: bool):
        """gate_up from xs_SD = x[tok] already in sorted-row order, both operands by tensor descriptor."""
        R, D, F = self.R, self.D, self.F
        a_SF = _empty(xs_SD, R.S, F)
        h_SF2 = _empty(xs_SD, R.S, 2 * F) if save_h else a_SF

        def launch(cfg):
            tile_e, tile_r0, n = R.schedule(cfg.BM)
            self.kn.gate_up_tma_kernel[(n * _cdiv(F, cfg.BN),)](
                _desc(xs_SD, [cfg.BM, cfg.BK]), _desc(w1_EDF2.view(self.E * D, 2 * F), [cfg.BK, cfg.BN]),
                tile_e, tile_r0, R.ends_E, a_SF, h_SF2, D, F, n, a_SF.stride(0), h_SF2.stride(0),
                SAVE_H=save_h, PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run("gate_up_tma", (save_h,), launch)
        return a_SF, (h_SF2 if save_h else None)

    def rows_gemm(self, kind, a_XK, b_EXN, transpose_b: bool, p_S, out_SN, gather_a=False, scatter=True,
                  save_a=None):
        """out = a[row] @ B_e (* p_KT[orow]); B_e = b_EXN[e] (K x N) or b_EXN[e]^T when transpose_b.
        gather_a: a is token-indexed (row r reads tok_S[r]); scatter: out row = orow_S[r] (k*T + t), else r;
        save_a (with gather_a): an (S x K) buffer that receives a[tok] in sorted-row order.
        A in sorted-row order goes to the tensor-descriptor kernel where it can (see Launcher.tma)."""
        if self.tma and not gather_a:
            return self.rows_gemm_tma(kind, a_XK, b_EXN, transpose_b, p_S, out_SN, scatter)
        R = self.R
        Kdim = a_XK.shape[1]
        N = b_EXN.shape[1] if transpose_b else b_EXN.shape[2]
        s_bk, s_bn = (b_EXN.stride(2), b_EXN.stride(1)) if transpose_b else (b_EXN.stride(1), b_EXN.stride(2))
        scale = p_S is not None
        b_desc = self.wdesc and Kdim % 64 == 0  # (gathered A here: B alone by tensor descriptor)
        b_2d = b_EXN.reshape(self.E * b_EXN.shape[1], b_EXN.shape[2])

        def launch(cfg):
            tile_e, tile_r0, n = R.schedule(cfg.BM)
            desc = _desc(b_2d, [cfg.BN, cfg.BK] if transpose_b else [cfg.BK, cfg.BN]) if b_desc else None
            self.kn.rows_gemm_kernel[(n * _cdiv(N, cfg.BN),)](
                a_XK, b_EXN, desc, R.tok_S, R.orow_S, p_S if scale else a_XK, tile_e, tile_r0, R.ends_E, out_SN,
                a_XK if save_a is None else save_a,
                N, Kdim, n, a_XK.stride(0), b_EXN.stride(0), s_bk, s_bn, out_SN.stride(0),
                a_XK.stride(0) if save_a is None else save_a.stride(0),
                GATHER_A=gather_a, SAVE_A=save_a is not None, B_DESC=b_desc, TRANS_B=transpose_b, SCATTER=scatter, SCALE_P=scale, EVEN_K=Kdim % cfg.BK == 0,
                EVEN_N=N % cfg.BN == 0, PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run(kind, (save_a is not None, b_desc), launch)
        return out_SN

    def rows_gemm_tma(self, kind, a_SK, b_EXN, transpose_b: bool, p_S, out_SN, scatter=True):
        """rows_gemm for A in sorted-row order, both operands by tensor descriptor (rows_gemm_tma_kernel)."""
        R = self.R
        E, Kdim = self.E, a_SK.shape[1]
        N = b_EXN.shape[1] if transpose_b else b_EXN.shape[2]
        b_2d = b_EXN.reshape(E * b_EXN.shape[1], b_EXN.shape[2])
        scale = p_S is not None

        def launch(cfg):
            tile_e, tile_r0, n = R.schedule(cfg.BM)
            a_desc = _desc(a_SK, [cfg.BM, cfg.BK])
            b_desc = _desc(b_2d, [cfg.BN, cfg.BK] if transpose_b else [cfg.BK, cfg.BN])
            self.kn.rows_gemm_tma_kernel[(n * _cdiv(N, cfg.BN),)](
                a_desc, b_desc, R.orow_S, p_S if scale else a_SK, tile_e, tile_r0, R.ends_E, out_SN,
                N, Kdim, n, out_SN.stride(0), TRANS_B=transpose_b, SCATTER=scatter, SCALE_P=scale,
                PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run(kind + "_tma", (), launch)
        return out_SN

    def swiglu_bwd(self, h_SF2, da_SF, p_S):
        R, F = self.R, self.F
        dh_SF2 = _empty(h_SF2, R.S, 2 * F)
        ap_SF = _empty(h_SF2, R.S, F)
        dp_S = torch.empty(R.S, device=h_SF2.device, dtype=torch.float32)
        BR, BF = 16, min(256, max(16, 1 << (F - 1).bit_length()))
        self.kn.swiglu_bwd_kernel[(_cdiv(R.S, BR),)](
            h_SF2, da_SF, R.order_S, p_S, dh_SF2, ap_SF, dp_S, R.S, F,
            h_SF2.stride(0), da_SF.stride(0), dh_SF2.stride(0), ap_SF.stride(0), BR=BR, BF=BF, num_warps=4)
        return dh_SF2, ap_SF, dp_S

    def bwd_act(self, dy_TD, x_TD, w1_EDF2, w2_EFD, p_S):
        """recompute=0: fused dA', recomputed g/u and SwiGLU backward (see bwd_act_kernel)."""
        R, D, F = self.R, self.D, self.F
        dh_SF2 = _empty(x_TD, R.S, 2 * F)
        ap_SF = _empty(x_TD, R.S, F)
        max_nb = max(_cdiv(F, c.BN) for c in tuning.CONFIGS["bwd_act"] + [tuning.INTERPRET_CFG, tuning.FP32_CFG])
        dp_SB = torch.zeros(R.S, max_nb, device=x_TD.device, dtype=torch.float32)

        def launch(cfg):
            tile_e, tile_r0, n = R.schedule(cfg.BM)
            self.kn.bwd_act_kernel[(n * _cdiv(F, cfg.BN),)](
                dy_TD, x_TD, w1_EDF2, w2_EFD, R.tok_S, R.order_S, p_S, tile_e, tile_r0, R.ends_E,
                dh_SF2, ap_SF, dp_SB,
                D, F, n, dy_TD.stride(0), x_TD.stride(0), w1_EDF2.stride(0), w1_EDF2.stride(1),
                w2_EFD.stride(0), w2_EFD.stride(1), dh_SF2.stride(0), ap_SF.stride(0), dp_SB.stride(0),
                EVEN_K=D % cfg.BK == 0, EVEN_N=F % cfg.BN == 0, PREC=self.prec, UPCAST=self.upcast,
                **_opts(cfg))

        cfg = self._run("bwd_act", (), launch)  # tuning runs may have left other columns: sum the final ones
        return dh_SF2, ap_SF, dp_SB[:, :_cdiv(F, cfg.BN)].sum(1)

    def wgrad(self, a, b, gather_a: bool, gather_b: bool, out_EMN, a_t=False, b_t=False, out_t=False):
        """out_EMN[e] = A_e^T @ B_e over expert e's sorted rows. A is (rows x M), or stored transposed (M x rows)
        when a_t; B likewise with b_t; out_t computes out_EMN[e]^T (M and N swapped). Gathered operands are
        token-indexed (row r reads tok_S[r])."""
        R = self.R
        M, N = out_EMN.shape[1], out_EMN.shape[2]
        s_oe, s_om, s_on = out_EMN.stride()
        if out_t:
            M, N, s_om, s_on = N, M, s_on, s_om
        s_ar, s_am = (a.stride(1), a.stride(0)) if a_t else (a.stride(0), a.stride(1))
        s_br, s_bn = (b.stride(1), b.stride(0)) if b_t else (b.stride(0), b.stride(1))

        def launch(cfg):
            grid = (self.E * _cdiv(M, cfg.BM) * _cdiv(N, cfg.BN),)
            self.kn.wgrad_kernel[grid](
                a, b, R.tok_S, R.starts_E, R.ends_E, out_EMN, M, N, s_ar, s_am, s_br, s_bn, s_oe, s_om, s_on,
                GATHER_A=gather_a, GATHER_B=gather_b, EVEN_M=M % cfg.BM == 0, EVEN_N=N % cfg.BN == 0,
                PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run("wgrad", (gather_a, gather_b, a_t, b_t), launch)
        return out_EMN


    def wgrad_tma(self, a, b, gather_a: bool, gather_b: bool, out_EMN, kind="wgrad_tma"):
        """As wgrad (a, b row-major, unit column stride), with the operand that is not gathered read through a
        tensor descriptor (TMA on Hopper)."""
        R = self.R
        M, N = out_EMN.shape[1], out_EMN.shape[2]

        def launch(cfg):
            a_desc = _desc(a, [cfg.BK, cfg.BM])
            b_desc = _desc(b, [cfg.BK, cfg.BN])
            grid = (self.E * _cdiv(M, cfg.BM) * _cdiv(N, cfg.BN),)
            self.kn.wgrad_tma_kernel[grid](
                a, a_desc, b, b_desc, R.tok_S, R.starts_E, R.ends_E, out_EMN, M, N, a.stride(0), b.stride(0),
                *out_EMN.stride(), GATHER_A=gather_a, GATHER_B=gather_b, EVEN_M=M % cfg.BM == 0,
                EVEN_N=N % cfg.BN == 0, PREC=self.prec, UPCAST=self.upcast, **_opts(cfg))

        self._run(kind, (gather_a, gather_b), launch)
        return out_EMN


def _nothing(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("moebench::triton_experts_fwd", mutates_args=())
def experts_fwd(x_TD: torch.Tensor, idx_TK: torch.Tensor, p_TK: torch.Tensor, w1_EDF2: torch.Tensor,
                w2_EFD: torch.Tensor, save_h: bool, for_backward: bool, wdesc: bool,
                pregather: str) -> list[torch.Tensor]:
    """[y_TD, h_SF2, xs_SD, order_S, tok_S, orow_S, starts_E, ends_E]; all but y empty when not for_backward,
    h_SF2 and xs_SD empty when not kept (recompute=0; xs also without the descriptor kernels)."""
    kn = kernels(not x_TD.is_cuda)
    R = Routing(idx_TK, w1_EDF2.shape[0], kn)
    L = Launcher(x_TD, w1_EDF2, R, wdesc, pregather)
    p_KT = p_TK.t().contiguous().view(-1)  # k-major, as the output rows of down
    keep = save_h and for_backward  # recompute=100 training: keep h and x[tok] in sorted-row order
    if keep and L.pregather:
        xs_SD = x_TD.index_select(0, R.tok_S)
        a_SF, h_SF2 = L.gate_up_sorted(xs_SD, w1_EDF2, True)
    else:
        a_SF, h_SF2, xs_SD = L.gate_up(x_TD, w1_EDF2, keep, save_x=keep and L.tma)
    o_SD = L.rows_gemm("down", a_SF, w2_EFD, False, p_KT, _empty(x_TD, R.S, L.D))
    del a_SF
    y_TD = _sum_k(o_SD, R)
    if not for_backward:  # distinct empty tensors: custom-op outputs must not alias one another
        return [y_TD] + [_nothing(x_TD) for _ in range(2)] + [_nothing(R.order_S) for _ in range(5)]
    return [y_TD, h_SF2 if h_SF2 is not None else _nothing(x_TD), xs_SD if xs_SD is not None else _nothing(x_TD),
            *R.tensors()]


@experts_fwd.register_fake
def _(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, save_h, for_backward, wdesc, pregather):
    (T, D), K, (E, _, F2) = x_TD.shape, idx_TK.shape[1], w1_EDF2.shape
    S, F = T * K, F2 // 2
    y = x_TD.new_empty(T, D)
    if not for_backward:  # distinct tensors, as the real op returns (custom-op outputs must not alias)
        return [y, x_TD.new_empty(0), x_TD.new_empty(0)] + [idx_TK.new_empty(0, dtype=torch.int32) for _ in range(5)]
    keep = save_h
    h = x_TD.new_empty(S, F2) if keep else x_TD.new_empty(0)
    xs = x_TD.new_empty(S, D) if keep and uses_tma(x_TD, D, F) else x_TD.new_empty(0)
    i32 = dict(dtype=torch.int32)
    return [y, h, xs, idx_TK.new_empty(S, **i32), idx_TK.new_empty(S, **i32), idx_TK.new_empty(S, **i32),
            idx_TK.new_empty(E, **i32), idx_TK.new_empty(E, **i32)]


@torch.library.custom_op("moebench::triton_experts_bwd", mutates_args=())
def experts_bwd(dy_TD: torch.Tensor, x_TD: torch.Tensor, p_TK: torch.Tensor, w1_EDF2: torch.Tensor,
                w2_EFD: torch.Tensor, h_SF2: torch.Tensor, xs_SD: torch.Tensor, order_S: torch.Tensor,
                tok_S: torch.Tensor, orow_S: torch.Tensor, starts_E: torch.Tensor, ends_E: torch.Tensor,
                need_x: bool, need_p: bool, need_w1: bool, need_w2: bool, wdesc: bool,
                pregather: str) -> list[torch.Tensor]:
    """[dx_TD, dp_TK, dw1_EDF2, dw2_EFD], each empty where not needed."""
    T, K = p_TK.shape
    R = Routing(None, w1_EDF2.shape[0], kernels(not x_TD.is_cuda), (order_S, tok_S, orow_S, starts_E, ends_E),
                T, K)
    L = Launcher(x_TD, w1_EDF2, R, wdesc, pregather)
    h_SF2 = h_SF2 if h_SF2.numel() else None
    xs_SD = xs_SD if xs_SD.numel() else None
    dy_TD, p_S = dy_TD.contiguous(), p_TK.reshape(-1)
    dys_SD = None
    if h_SF2 is not None:  # recompute=100: plain GEMM for dA', then the elementwise SwiGLU backward
        # with xs_SD kept, dy[tok] is also made in sorted-row order (copied first with pregather, else written
        # by the gathering dA' GEMM): both dW GEMMs then read contiguous operands by tensor descriptor
        # (gathered dW operands cost 20-40% of the dW rate on the H100)
        if xs_SD is not None and L.pregather:
            dys_SD = dy_TD.index_select(0, R.tok_S)
            da_SF = L.rows_gemm_tma("dact", dys_SD, w2_EFD, True, None, _empty(x_TD, R.S, L.F), scatter=False)
        else:
            dys_SD = _empty(x_TD, R.S, L.D) if xs_SD is not None and need_w2 else None
            da_SF = L.rows_gemm("dact", dy_TD, w2_EFD, True, None, _empty(x_TD, R.S, L.F), gather_a=True,
                                scatter=False, save_a=dys_SD)
        dh_SF2, ap_SF, dp_S = L.swiglu_bwd(h_SF2, da_SF, p_S)
        del da_SF
    else:
        dh_SF2, ap_SF, dp_S = L.bwd_act(dy_TD, x_TD, w1_EDF2, w2_EFD, p_S)
    dw2 = _nothing(w2_EFD)
    if need_w2:
        dw2 = _empty(w2_EFD, *w2_EFD.shape)
        if dys_SD is not None:
            L.wgrad_tma(ap_SF, dys_SD, False, False, dw2, kind="wgrad_sorted")
        else:
            L.wgrad(ap_SF, dy_TD, False, True, dw2)
    del ap_SF, dys_SD
    dx = _nothing(x_TD)
    if need_x:
        dx_SD = L.rows_gemm("dx", dh_SF2, w1_EDF2, True, None, _empty(x_TD, R.S, L.D))
        dx = _sum_k(dx_SD, R)
        del dx_SD
    dw1 = _nothing(w1_EDF2)
    if need_w1:
        dw1 = _empty(w1_EDF2, *w1_EDF2.shape)
        if xs_SD is not None:
            L.wgrad_tma(xs_SD, dh_SF2, False, False, dw1, kind="wgrad_sorted")
        else:
            L.wgrad(x_TD, dh_SF2, True, False, dw1)
    dp = dp_S.view(T, K).to(p_TK.dtype) if need_p else _nothing(p_TK)
    return [dx, dp, dw1, dw2]


@experts_bwd.register_fake
def _(dy_TD, x_TD, p_TK, w1_EDF2, w2_EFD, h_SF2, xs_SD, order_S, tok_S, orow_S, starts_E, ends_E,
      need_x, need_p, need_w1, need_w2, wdesc, pregather):
    def like(t, need):
        return torch.empty_like(t) if need else t.new_empty(0)
    return [like(x_TD, need_x), like(p_TK, need_p), like(w1_EDF2, need_w1), like(w2_EFD, need_w2)]


def _setup(ctx, inputs, output):
    x_TD, _idx, p_TK, w1_EDF2, w2_EFD, _save_h, _fb, wdesc, pregather = inputs
    ctx.save_for_backward(x_TD, p_TK, w1_EDF2, w2_EFD, *output[1:])
    ctx.opts = (wdesc, pregather)


def _backward(ctx, grads):
    dy_TD = grads[0]  # the gradient of y; the other outputs (what backward keeps) are not differentiated
    x_TD, p_TK, w1_EDF2, w2_EFD, *saved = ctx.saved_tensors
    need_x, _, need_p, need_w1, need_w2 = ctx.needs_input_grad[:5]
    dx, dp, dw1, dw2 = experts_bwd(dy_TD, x_TD, p_TK, w1_EDF2, w2_EFD, *saved, need_x, need_p, need_w1, need_w2,
                                   *ctx.opts)
    return (dx if need_x else None), None, (dp if need_p else None), (dw1 if need_w1 else None), \
        (dw2 if need_w2 else None), None, None, None, None


experts_fwd.register_autograd(_backward, setup_context=_setup)


def _sum_k(o_SD, R: Routing):
    """Per-token sum over k of rows stored k-major (row k*T + t): a reduction over the outermost dim (for K=2 an
    add of two contiguous halves, which ran at half the time of torch's reduction on the H100)."""
    if R.K == 1:
        return o_SD
    o_KTD = o_SD.view(R.K, R.T, o_SD.shape[1])
    return torch.add(o_KTD[0], o_KTD[1]) if R.K == 2 else o_KTD.sum(0)


PAD_TO = 64  # F and D are zero-padded to a multiple of this (weights copied) so every tile is full and aligned


def _pad_block(x_TD, w1_EDF2, w2_EFD):
    """Zero-pad F (gate and up halves, w2 rows) and D: silu(0) * 0 = 0 and zero rows add nothing."""
    _E, D, F2 = w1_EDF2.shape
    F = F2 // 2
    pad_F, pad_D = (-F) % PAD_TO, (-D) % PAD_TO
    if pad_F:
        w1_EDF2 = torch.cat([torch.nn.functional.pad(w1_EDF2[..., :F], (0, pad_F)),
                             torch.nn.functional.pad(w1_EDF2[..., F:], (0, pad_F))], dim=-1)
        w2_EFD = torch.nn.functional.pad(w2_EFD, (0, 0, 0, pad_F))
    if pad_D:
        x_TD = torch.nn.functional.pad(x_TD, (0, pad_D))
        w1_EDF2 = torch.nn.functional.pad(w1_EDF2, (0, 0, 0, pad_D))
        w2_EFD = torch.nn.functional.pad(w2_EFD, (0, pad_D))
    return x_TD, w1_EDF2, w2_EFD


def moe_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, recompute: int = 100, wdesc: bool = True,
                pregather: str = "auto"):
    if recompute not in (0, 100):
        raise ValueError(f"triton: recompute must be 0 (keep inputs only) or 100 (keep all), got {recompute}")
    if pregather not in PREGATHER:
        raise ValueError(f"triton: pregather must be one of {', '.join(PREGATHER)}, got {pregather!r}")
    tensors = (x_TD, p_TK, w1_EDF2, w2_EFD)
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    D = x_TD.shape[1]
    if PAD_TO:
        x_TD, w1_EDF2, w2_EFD = _pad_block(x_TD, w1_EDF2, w2_EFD)
    x_TD, p_TK, w1_EDF2, w2_EFD = (t.contiguous() for t in (x_TD, p_TK, w1_EDF2, w2_EFD))
    y_TD = experts_fwd(x_TD, idx_TK.contiguous(), p_TK, w1_EDF2, w2_EFD, recompute == 100, for_backward, wdesc,
                       pregather)[0]
    return y_TD[:, :D] if y_TD.shape[1] != D else y_TD
