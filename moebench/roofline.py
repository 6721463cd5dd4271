"""A FLOP and minimum-byte model of one MoE layer step, for placing a case on a roofline.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K (token, expert) slots, Fs the hidden
size of the shared experts merged into one SwiGLU MLP (0 without), b bytes per element of the case's dtype,
E' = min(E, S) the experts that can receive a token (every expert, at the shapes moebench runs).

FLOPs (2 per multiply-add; SwiGLU experts: gate and up are D x F each, down is F x D):
  router           forward 2*T*D*E (logits); backward 4*T*D*E (d x and d w_router)
  permutation      0 (sorting and gathering move data, they do no arithmetic)
  expert GEMMs     forward 6*S*D*F (gate+up 4*S*D*F, down 2*S*D*F), + 6*T*D*Fs for the shared experts;
                   backward dX 6*S*D*F (dA = dy W2^T, then dX = dH W1^T) and dW 6*S*D*F (dW1, dW2), the same
                   again for the shared experts: a training step is 3x the forward, as ModelSpec counts it
                   (spec.layer_flops_per_token() * 3) plus the router, which ModelSpec leaves out.
Minimum bytes: what any implementation must move between device memory and the chip in each pass (forward;
backward for a training step) when every input is read once, every output written once and nothing in between
(the gathered rows, h = [x W_g | x W_u], the SwiGLU output, per-slot outputs) ever leaves the chip:
  router           forward: read x (T*D*b) and w_router (D*E*b), write the routing (S indices and S gate
                   weights, 4 bytes each); backward: read w_router, write its gradient (2*D*E*b)
  permutation      read the S expert indices and write the S-long sorted order (4 bytes each: 8*S)
  expert GEMMs     forward: read the weights of E' experts (3*E'*D*F*b) and the gate weights (4*S), write y
                   (T*D*b); shared experts: their weights (3*D*Fs*b);
                   backward dX: read dy (T*D*b) and the expert weights again, write dx (T*D*b); shared
                   experts: read their weights again (3*D*Fs*b);
                   backward dW: read x again (T*D*b), write the weight gradients (3*E'*D*F*b); shared experts:
                   write their gradients (3*D*Fs*b)
Arithmetic intensity = FLOPs / minimum bytes; a case can reach at most min(ceiling, intensity * bandwidth).
This is a lower bound on traffic, so a real kernel sits at or left of its point: the model says how far from
the compute roof an ideal implementation could get, not what one does. Whole-model cases (attention,
embeddings, optimizer) are not modelled: of_case returns None for them.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
INDEX_BYTES = 4   # an int32 expert index or sorted position
GATE_BYTES = 4    # a float32 gate weight


@dataclass(frozen=True)
class Part:
    name: str
    flops: float
    bytes: float


@dataclass(frozen=True)
class LayerModel:
    parts: tuple[Part, ...]

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def intensity(self) -> float:
        """FLOPs per byte of minimum traffic."""
        return self.flops / self.bytes

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part '{name}'; parts: {', '.join(p.name for p in self.parts)}")


def attainable_tflops(intensity: float, ceiling_tflops: float, bandwidth_gbps: float) -> float:
    """The roof at this intensity: min(compute ceiling, intensity * bandwidth); GB/s * FLOP/B = GFLOP/s."""
    return min(ceiling_tflops, intensity * bandwidth_gbps / 1e3)


def layer_model(T: int, D: int, F: int, E: int, K: int, *, shared_hidden: int = 0, train: bool = True,
                dtype: str = "bfloat16") -> LayerModel:
    """FLOPs and minimum bytes of one MoE layer step (forward, or forward + backward when train)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype '{dtype}' has no byte size; valid: {', '.join(DTYPE_BYTES)}")
    if min(T, D, F, E, K) < 1 or shared_hidden < 0:
        raise ValueError(f"sizes must be >= 1 (T={T}, D={D}, F={F}, E={E}, K={K}, shared_hidden={shared_hidden})")
    b, S, Fs = DTYPE_BYTES[dtype], T * K, shared_hidden
    used = min(E, S)
    w_experts = 3 * used * D * F * b
    parts = [
        Part("router", 2 * T * D * E, T * D * b + D * E * b + S * (INDEX_BYTES + GATE_BYTES)),
        Part("permutation", 0, 2 * S * INDEX_BYTES),
        Part("expert GEMMs fwd", 6 * S * D * F + 6 * T * D * Fs, w_experts + S * GATE_BYTES + T * D * b
             + 3 * D * Fs * b),
    ]
    if train:
        parts += [
            Part("router bwd", 4 * T * D * E, 2 * D * E * b),
            Part("expert GEMMs dX", 6 * S * D * F + 6 * T * D * Fs, T * D * b + w_experts + T * D * b
                 + 3 * D * Fs * b),
            Part("expert GEMMs dW", 6 * S * D * F + 6 * T * D * Fs, T * D * b + w_experts + 3 * D * Fs * b),
        ]
    return LayerModel(tuple(Part(p.name, float(p.flops), float(p.bytes)) for p in parts))


def of_case(case: dict) -> LayerModel | None:
    """The model of a record's `case` (its model, workload): None for anything but a layer-level case."""
    w, m = case.get("workload") or {}, case.get("model") or {}
    if w.get("level") != "layer" or w.get("dtype") not in DTYPE_BYTES:
        return None
    try:
        T = int(w["batch"]) * int(w["seq"])
        shared = int(m.get("n_shared_experts") or 0) * int(m.get("d_shared") or m["d_expert"])
        return layer_model(T, int(m["d_model"]), int(m["d_expert"]), int(m["n_experts"]), int(m["top_k"]),
                           shared_hidden=shared, train=w.get("mode") == "train", dtype=w["dtype"])
    except (KeyError, TypeError, ValueError):
        return None
