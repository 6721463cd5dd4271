"""Compile every kernel variant and config for sm_90 without a GPU and print registers, spills, shared memory.

  python -m implementations.triton.compile_check [kernel ...]

Uses triton's bundled ptxas; costs no device time. Pointers and strides are marked 16-divisible, as the
launcher's specialisation does for aligned tensors (the benchmark shapes).
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from implementations.triton import kernels as kn
from implementations.triton.tuning import CONFIGS

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
BF16 = "*bf16"
SM90 = GPUTarget("cuda", 90, 64)
VARIANTS = {  # kind: (kernel, {arg: type}, {constexpr: value})
    "gate_up": (kn.gate_up_kernel, {"x_ptr": BF16, "w1_desc": lambda c: _td(c.BK, c.BN), "a_ptr": BF16,
                                    "h_ptr": BF16, "xs_ptr": BF16}, {"SAVE_H": True, "SAVE_X": True, "W_DESC": True}),
    "gate_up_nosave": (kn.gate_up_kernel, {"x_ptr": BF16, "w1_desc": lambda c: _td(c.BK, c.BN), "a_ptr": BF16,
                                           "h_ptr": BF16, "xs_ptr": BF16},
                       {"SAVE_H": False, "SAVE_X": False, "W_DESC": True}),
    "down": (kn.rows_gemm_kernel, {"a_ptr": BF16, "b_ptr": BF16, "p_ptr": BF16, "out_ptr": BF16, "as_ptr": BF16},
             {"GATHER_A": False, "SAVE_A": False, "B_DESC": False, "TRANS_B": False, "SCATTER": True,
              "SCALE_P": True}),
    "dx": (kn.rows_gemm_kernel, {"a_ptr": BF16, "b_ptr": BF16, "p_ptr": BF16, "out_ptr": BF16, "as_ptr": BF16},
           {"GATHER_A": False, "SAVE_A": False, "B_DESC": False, "TRANS_B": True, "SCATTER": True,
            "SCALE_P": False}),
    "dact": (kn.rows_gemm_kernel, {"a_ptr": BF16, "b_desc": lambda c: _td(c.BN, c.BK), "p_ptr": BF16,
                                   "out_ptr": BF16, "as_ptr": BF16},
             {"GATHER_A": True, "SAVE_A": True, "B_DESC": True, "TRANS_B": True, "SCATTER": False,
              "SCALE_P": False}),
    "bwd_act": (kn.bwd_act_kernel, {"dy_ptr": BF16, "x_ptr": BF16, "w1_ptr": BF16, "w2_ptr": BF16, "p_ptr": BF16,
                                        "dh_ptr": BF16, "ap_ptr": BF16, "dp_ptr": "*fp32"}, {}),
    "wgrad": (kn.wgrad_kernel, {"a_ptr": BF16, "b_ptr": BF16, "out_ptr": BF16},  # unit strides: as the JIT specialises
              {"GATHER_A": True, "GATHER_B": False, "stride_am": 1, "stride_bn": 1, "stride_on": 1}),
    "wgrad_kmajor": (kn.wgrad_kernel, {"a_ptr": BF16, "b_ptr": BF16, "out_ptr": BF16},
                     {"GATHER_A": False, "GATHER_B": True, "stride_ar": 1, "stride_bn": 1, "stride_om": 1}),
    # tensor-descriptor kernels: a descriptor's type names its block shape, which depends on the config
    "gate_up_tma": (kn.gate_up_tma_kernel, {"xs_desc": lambda c: _td(c.BM, c.BK), "w1_desc": lambda c: _td(c.BK, c.BN),
                                            "a_ptr": BF16, "h_ptr": BF16}, {"SAVE_H": True}),
    "down_tma": (kn.rows_gemm_tma_kernel, {"a_desc": lambda c: _td(c.BM, c.BK), "b_desc": lambda c: _td(c.BK, c.BN),
                                           "p_ptr": BF16, "out_ptr": BF16},
                 {"TRANS_B": False, "SCATTER": True, "SCALE_P": True}),
    "dact_tma": (kn.rows_gemm_tma_kernel, {"a_desc": lambda c: _td(c.BM, c.BK), "b_desc": lambda c: _td(c.BN, c.BK),
                                           "p_ptr": BF16, "out_ptr": BF16},
                 {"TRANS_B": True, "SCATTER": False, "SCALE_P": False}),
}


def _td(rows, cols):
    return f"tensordesc<bf16[{rows}, {cols}]>"


def compile_one(kind, cfg, target=SM90):
    fn, ptr_types, consts = VARIANTS[kind]
    consts = dict(consts, PREC="tf32", UPCAST=False, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M)
    for flag in ("EVEN_K", "EVEN_N", "EVEN_M"):
        if flag in fn.arg_names:
            consts[flag] = True
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif callable(ptr_types.get(name)):
            sig[name] = ptr_types[name](cfg)
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("D", "F", "N", "M", "Kdim"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else -1, "spills": int(stack.group(1)) if stack else -1,
                "smem": k.metadata.shared, "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx}


def main(kinds):
    for kind in kinds or VARIANTS:
        for cfg in CONFIGS[kind.replace("_nosave", "").replace("_kmajor", "")]:
            try:
                r = compile_one(kind, cfg)
                print(f"{kind:18s} {tuple(cfg)}  regs {r['regs']:3d} stack {r['spills']:4d} smem {r['smem']:6d} "
                      f"wgmma {r['wgmma']} mma.sync {r['mma']}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{kind:18s} {tuple(cfg)}  FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
