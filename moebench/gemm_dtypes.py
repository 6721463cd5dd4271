"""The expert-GEMM dtypes a workload can ask for (workload.gemm_dtype): plain data, imported by moebench.spec (the
field's choices) and moebench.registry (what a backend may declare), importing nothing.

The rest of the step runs in workload.dtype either way; the fp8 ones take dtype bfloat16 (moebench.spec).
"""
from __future__ import annotations

GEMM_DTYPES = {
    "default": "the workload's dtype",
    "fp8-rowwise": "e4m3 operands (activations one scale per row, weights one per output column; power-of-two fp32 "
                   "scales, moebench/quant.py), fp32 accumulation, bf16 out; backward GEMMs in bf16 (not fp8)",
    "fp8-rowwise-fp8bwd": "fp8-rowwise forward, and the backward GEMMs in e4m3 too (dgrad rowwise, wgrad scaled per "
                          "expert group over tokens: torchao's fp8 rowwise MoE recipe); gradients between GEMMs bf16",
}
