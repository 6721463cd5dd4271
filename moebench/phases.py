"""Where a step's time goes: a recorded kernel list (`metrics.profile.kernels`, from `moebench run --profile`)
split into phases by kernel name, per backend.

    step_phases(profile, step_ms, backend="triton", mode="train", level="layer", dtype="bfloat16",
                options={"recompute": 100}) -> {phase: ms per step}

A profile holds, per kernel name, the device time summed over `steps` profiled steps. Each name is matched
against an ordered list of rules (first match wins); a rule gives one phase or splits the kernel's time over
several. The rules, and what each is based on:
  optimizer          AdamW's fused / multi-tensor kernels
  router/top-k       softmax / sigmoid scores, top-k, and (in a bf16/fp16 case) the fp32 GEMMs: moebench's router
                     computes its logits in float32 (moebench/routing.py), nothing else runs an fp32 GEMM there
  combine            index_add_ back to the tokens (indexFuncLargeIndex), the sum over the K slots (reduce_kernel;
                     not cuBLAS's splitKreduce_kernel, which is part of a GEMM)
  permutation/gather sorting slots by expert (cub radix sort, argsort), scans, searchsorted, the block schedule
                     (triton schedule_kernel), row gathers (index, gather, index_select) and their backward
                     (indexing_backward), torch._grouped_mm's problem set-up
  activation         SiLU / SwiGLU forward and backward
  expert GEMMs       by backend:
                       triton     gate_up(_tma)_kernel: forward (the gather and the SwiGLU epilogue are fused into
                                  it, so their time is counted here); bwd_act_kernel: dX (it recomputes g, u in the
                                  same loop: recompute=0); wgrad(_tma)_kernel: dW; rows_gemm(_tma)_kernel runs the
                                  down projection (forward), dA = dy W2^T and dX = dH W1^T, which its name cannot
                                  tell apart: its time is split by their FLOP shares (down 2SFD, dA 2SFD, dX 4SFD:
                                  1/4 forward, 3/4 dX with recompute=100; recompute=0 computes dA in bwd_act:
                                  1/3 forward, 2/3 dX)
                       others     grouped GEMMs (CUTLASS GroupProblemShape) and, for the loop backends (naive,
                                  shuffle), dense GEMMs (cuBLAS nvjet / xmma / cutlass): forward, dX and dW have
                                  equal FLOPs for a SwiGLU expert (6SDF each), and one name serves all three, so
                                  a training step's GEMM time is split 1/3 each
                     In a whole-model case the dense GEMMs of backends with their own expert kernels (grouped_mm,
                     triton) are the attention projections and the head: `other layers`, with attention and
                     norm kernels; for the loop backends experts and other layers share the dense GEMMs:
                     `dense GEMMs (experts + other layers)`.
  other kernels      anything no rule names (copies, fills, generic elementwise products such as g * u or the
                     gate weighting): listed by unmatched(), never guessed
  idle gaps          step time - kernel time per step (>= 0; a negative difference, kernels overlapping or the
                     profiled steps running slower than the timed ones, is reported as 0)
Names are CUDA kernel names (torch.profiler's device events) or, on CPU, aten op names.
"""
from __future__ import annotations

import re

PHASES = ("router/top-k", "permutation/gather", "expert GEMMs fwd", "activation", "combine", "dX", "dW",
          "dense GEMMs (experts + other layers)", "other layers", "optimizer", "other kernels", "idle gaps")
FWD, DX, DW = "expert GEMMs fwd", "dX", "dW"
Rule = tuple[re.Pattern, dict[str, float]]

_GROUPED = r"GroupProblemShape|GroupedGemm|grouped_gemm_kernel|aten::_grouped_mm"
_DENSE = r"gemm|nvjet|xmma|cutlass|cublas|aten::(?:mm|addmm|bmm|matmul|linear)\b"
_LAYERS = r"flash|fmha|attention|sdpa|cudnn|rms|layer_?norm|embedding|cross_entropy|log_softmax|nll_loss"


def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


def _gemm_split(train: bool, fwd_share: float | None = None) -> dict[str, float]:
    """A GEMM kernel that runs forward and backward: its time by FLOP share. fwd_share None: forward, dX and dW
    a third each; else forward fwd_share and dX the rest (a kernel that never computes dW)."""
    if not train:
        return {FWD: 1.0}
    if fwd_share is None:
        return {FWD: 1 / 3, DX: 1 / 3, DW: 1 / 3}
    return {FWD: fwd_share, DX: 1 - fwd_share}


def rules(backend: str, *, mode: str = "train", level: str = "layer", dtype: str = "bfloat16",
          options: dict | None = None) -> list[Rule]:
    """The ordered (pattern, {phase: share}) rules for one backend and workload; first match wins."""
    if mode not in ("train", "forward"):
        raise ValueError(f"mode '{mode}' is not one of: train, forward")
    if level not in ("layer", "model"):
        raise ValueError(f"level '{level}' has no step phases; valid: layer, model")
    base = backend.split("+")[0]
    train = mode == "train"
    out: list[Rule] = [(_rx(r"multi_tensor_apply|fused_adam|adamw|_foreach_"), {"optimizer": 1.0})]
    if level == "model":  # before the router's softmax: the loss's log_softmax belongs to the other layers
        out.append((_rx(_LAYERS), {"other layers": 1.0}))
    router = r"topk|softmax|sigmoid|aten::_?softmax"
    if dtype != "float32":
        router += r"|gemm_f32f32|sgemm"
    out.append((_rx(router), {"router/top-k": 1.0}))
    out.append((_rx(r"indexFuncLargeIndex|index_add|(?<!splitK)reduce_kernel|aten::sum\b"), {"combine": 1.0}))
    out.append((_rx(r"sort|scan|searchsorted|arange|reverse_indices|gather|index_elementwise|index_select"
                    r"|indexSelect|indexing_backward|scatter|schedule_kernel"
                    r"|prepare_grouped_gemm|aten::index\b|cumsum"), {"permutation/gather": 1.0}))
    out.append((_rx(r"silu|swiglu"), {"activation": 1.0}))
    if base == "triton":
        rc0 = (options or {}).get("recompute", 100) == 0
        out += [(_rx(r"gate_up(?:_tma)?_kernel"), {FWD: 1.0}),
                (_rx(r"bwd_act_kernel"), {DX: 1.0}),
                (_rx(r"wgrad(?:_tma)?_kernel"), {DW: 1.0}),
                (_rx(r"rows_gemm(?:_tma)?_kernel"), _gemm_split(train, 1 / 3 if rc0 else 1 / 4))]
    out.append((_rx(_GROUPED), _gemm_split(train)))
    if level == "model":
        own = base in ("grouped_mm", "triton")
        out.append((_rx(_DENSE), {"other layers": 1.0} if own else {"dense GEMMs (experts + other layers)": 1.0}))
    else:
        out.append((_rx(_DENSE), _gemm_split(train)))
    return out


def attribute(kernels: list[dict], rule_list: list[Rule]) -> tuple[dict[str, float], list[str]]:
    """Summed ms per phase over the kernel list, and the names no rule matched (counted as `other kernels`)."""
    ms = {p: 0.0 for p in PHASES}
    unmatched = []
    for k in kernels:
        try:
            name, t = str(k["name"]), float(k["ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a kernel entry needs 'name' and 'ms' (number); got {k!r}") from e
        for rx, split in rule_list:
            if rx.search(name):
                for phase, share in split.items():
                    ms[phase] += t * share
                break
        else:
            ms["other kernels"] += t
            unmatched.append(name)
    return ms, unmatched


def step_phases(profile: dict, step_ms: float, *, backend: str, mode: str = "train", level: str = "layer",
                dtype: str = "bfloat16", options: dict | None = None) -> dict[str, float]:
    """ms per step in each phase of PHASES (idle gaps = step_ms - kernel ms per step, at least 0)."""
    steps = profile.get("steps")
    if not isinstance(steps, (int, float)) or steps <= 0:
        raise ValueError(f"profile 'steps' must be a positive number; got {steps!r}")
    kernels = profile.get("kernels")
    if not isinstance(kernels, list):
        raise ValueError("profile has no 'kernels' list")  # noqa: TRY004 - one error type for bad input
    ms, _ = attribute(kernels, rules(backend, mode=mode, level=level, dtype=dtype, options=options))
    per_step = {p: v / steps for p, v in ms.items()}
    busy = sum(per_step.values())
    per_step["idle gaps"] = max(0.0, float(step_ms) - busy)
    return per_step


def unmatched(profile: dict, *, backend: str, mode: str = "train", level: str = "layer", dtype: str = "bfloat16",
              options: dict | None = None) -> list[str]:
    """Kernel names of a profile that no rule names (they are counted as `other kernels`)."""
    return attribute(profile.get("kernels") or [], rules(backend, mode=mode, level=level, dtype=dtype,
                                                         options=options))[1]
