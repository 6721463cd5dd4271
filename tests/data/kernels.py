"""CONSTRUCTED kernel lists in the shape of `metrics.profile` (moebench/core: {path, steps, device, kernels:
[{name, ms, calls}]}), for tests of moebench.phases and the report's phase plot. NOT a recorded trace: no GPU
profile is recorded in results/. The kernel NAMES are those the code launches: our Triton kernels
(implementations/triton/kernels.py) and torch/CUTLASS/cuBLAS kernel names as torch.profiler printed them in the
Triton development logs (results/triton_dev/v7_profile_layer_h100.json, v8_profile_gaps_h100.log: names only,
cut where those logs cut them). The times and call counts are made up, chosen so each phase is visible.

Each entry: (name, ms over STEPS steps, calls, the phase the rules must give it).
"""
from __future__ import annotations

STEPS = 3
CUTLASS_GROUPED = ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13Gemm"
                   "UniversalINS5_17GroupProblemShapeIN4cute5tupleIJ")
ROUTER_GEMM = ("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x32x8_stage3_warpsize1x2x1_ffma_aligna4_alignc4_"
               "execute_kernel")
SOFTMAX = "void (anonymous namespace)::softmax_warp_forward<float, float, float, 6, false, false>(float*, float const*, i"
SOFTMAX_BWD = ("void (anonymous namespace)::softmax_warp_backward<float, float, float, 6, false, false>(float*, "
               "float const*, ")
RADIX = ("void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::detail::"
         "radix")
SCAN = "void at_cuda_detail::cub::detail::scan::DeviceScanKernel<at_cuda_detail::cub::detail::scan::policy_hub<long, l"
GATHER = "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long, long, long, long, bool)"
INDEX = ("void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<at::native::index_kernel_"
         "impl<a")
INDEX_BWD = ("void (anonymous namespace)::indexing_backward_kernel<c10::BFloat16, 4>(long const*, long const*, "
             "c10::BFloat16")
SCATTER = ("void at::native::_scatter_gather_elementwise_kernel<128, 8, at::native::_cuda_scatter_gather_internal_"
           "kernel<f")
SILU = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
        "namespace)::silu_kernel(at::TensorIter")
SILU_BWD = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
            "namespace)::silu_backward_kernel(at::T")
INDEX_ADD = "void at::native::indexFuncLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true, at::native::(anonymous"
SUM_K = ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::func_wrapper_t<"
         "c10::BFl")
MUL = ("void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
       "c10:")
MEMCPY = "Memcpy DtoD (Device -> Device)"
NVJET = "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT"
SPLITK = "void cublasLt::splitKreduce_kernel<32, 16, int, float, float, float, float, false, float, float, float, true, "
ADAM = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedAdam"

THIRDS = {"expert GEMMs fwd": 1 / 3, "dX": 1 / 3, "dW": 1 / 3}

# a grouped_mm layer training step (router, sort, two grouped GEMMs forward, four backward)
GROUPED_MM_TRAIN = [
    (CUTLASS_GROUPED, 90.0, 18, THIRDS),
    (ROUTER_GEMM, 1.5, 3, "router/top-k"),
    (SOFTMAX, 0.6, 3, "router/top-k"),
    (SOFTMAX_BWD, 0.6, 3, "router/top-k"),
    (RADIX, 0.9, 3, "permutation/gather"),
    (SCAN, 0.3, 3, "permutation/gather"),
    (SCATTER, 0.3, 3, "permutation/gather"),
    (INDEX, 1.2, 3, "permutation/gather"),
    (INDEX_BWD, 0.9, 3, "permutation/gather"),
    (GATHER, 0.6, 6, "permutation/gather"),
    (SILU, 4.2, 3, "activation"),
    (SILU_BWD, 4.8, 3, "activation"),
    (INDEX_ADD, 3.6, 3, "combine"),
    (MUL, 10.8, 12, "other kernels"),
    (MEMCPY, 0.6, 3, "other kernels"),
]

# a triton (recompute=100) layer training step
TRITON_TRAIN = [
    ("gate_up_kernel", 36.0, 3, "expert GEMMs fwd"),
    ("rows_gemm_kernel", 72.0, 9, {"expert GEMMs fwd": 1 / 4, "dX": 3 / 4}),
    ("swiglu_bwd_kernel", 6.0, 3, "activation"),
    ("wgrad_tma_kernel", 48.0, 6, "dW"),
    ("schedule_kernel", 0.3, 3, "permutation/gather"),
    (RADIX, 0.9, 3, "permutation/gather"),
    (ROUTER_GEMM, 1.5, 3, "router/top-k"),
    (SOFTMAX, 0.6, 3, "router/top-k"),
    (SUM_K, 2.1, 6, "combine"),
]

# a naive layer training step: per-expert dense GEMMs (cuBLAS), gathers and index_add
NAIVE_TRAIN = [
    (NVJET, 96.0, 72, THIRDS),
    (SPLITK, 3.0, 12, THIRDS),
    (ROUTER_GEMM, 1.5, 3, "router/top-k"),
    (INDEX, 6.0, 24, "permutation/gather"),
    (SILU, 4.2, 24, "activation"),
    (INDEX_ADD, 7.2, 24, "combine"),
    (MUL, 9.0, 48, "other kernels"),
]

# a grouped_mm whole-model training step: the optimizer and the other layers appear
MODEL_TRAIN = [
    (CUTLASS_GROUPED, 60.0, 36, THIRDS),
    (NVJET, 45.0, 60, "other layers"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfl",
     15.0, 12, "other layers"),
    (ADAM, 6.0, 3, "optimizer"),
    (SOFTMAX, 0.6, 6, "router/top-k"),
    (RADIX, 0.9, 6, "permutation/gather"),
]


def profile(entries, steps: int = STEPS) -> dict:
    """A metrics.profile block from entries (constructed, see the module docstring)."""
    return {"path": "CONSTRUCTED (tests/data/kernels.py)", "steps": steps, "device": "cuda",
            "kernels": [{"name": n, "ms": ms, "calls": calls} for n, ms, calls, _ in entries]}


def expected_ms(entries, steps: int = STEPS) -> dict[str, float]:
    """ms per step per phase that the entries' expected phases add up to."""
    out: dict[str, float] = {}
    for _, ms, _, phase in entries:
        for p, share in ({phase: 1.0} if isinstance(phase, str) else phase).items():
            out[p] = out.get(p, 0.0) + ms * share / steps
    return out
