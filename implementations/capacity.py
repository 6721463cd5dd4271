"""capacity: Switch-style expert capacity with token dropping, as padded batched matmuls.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, C capacity (rows per expert), S = T*K slots.
Every expert gets a buffer of exactly C = ceil(capacity_factor * T * K / E) rows (moebench.routing.capacity).
Slots fill their expert's buffer first come, first served in rank-major order (all 1st choices, then all 2nd
choices; token order within a rank: routing.slot_positions); a slot past C is dropped and contributes nothing
(the token keeps its residual). Empty rows are zero and their outputs are never read. Compute is E*C rows
whatever the routing, which is the Switch trade: fixed shapes (one bmm per projection, no host sync) for
dropped tokens and padding. Not dropless, so parity compares it with `naive` on the kept slots only
(Backend.capacity tells the harness C; the harness records the dropped fraction from the loads).
"""
import math

import torch
import torch.nn.functional as F

from moebench.registry import Backend, register
from moebench.routing import capacity, slot_positions

DEFAULT_CF = 1.25


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, capacity_factor=DEFAULT_CF):
    T, D = x_TD.shape
    K, E = idx_TK.shape[1], w1_EDF2.shape[0]
    C = capacity(T, K, E, capacity_factor)
    pos_TK = slot_positions(idx_TK, E)
    keep_TK = pos_TK < C
    dest_S = torch.where(keep_TK, idx_TK * C + pos_TK, E * C).reshape(-1)   # row E*C: the overflow bin
    tok_S = torch.arange(T, device=x_TD.device).repeat_interleave(K)
    # which token fills each buffer row (T: an empty row, reads the zero row appended to x)
    src_R = torch.full((E * C + 1,), T, dtype=torch.long, device=x_TD.device).scatter_(0, dest_S, tok_S)
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])
    x_ECD = x_pad[src_R[:E * C]].view(E, C, D)
    g_ECF, u_ECF = torch.bmm(x_ECD, w1_EDF2).chunk(2, dim=-1)
    o_ECD = torch.bmm(F.silu(g_ECF) * u_ECF, w2_EFD)
    o_pad = torch.cat([o_ECD.reshape(E * C, D), o_ECD.new_zeros(1, D)])
    w_S = (p_TK * keep_TK).reshape(-1, 1).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, o_pad[dest_S] * w_S)


def _capacity(T: int, K: int, E: int, capacity_factor: float = DEFAULT_CF) -> int:
    return capacity(T, K, E, capacity_factor)


def _validate(options: dict) -> str | None:
    cf = options.get("capacity_factor", DEFAULT_CF)
    if isinstance(cf, bool) or not (isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0):
        return f"capacity_factor must be a finite number > 0 (slots per expert = ceil(cf * T * K / E)), got {cf!r}"
    return None


register(Backend(
    name="capacity",
    forward=forward,
    description="Switch-style capacity factor: E x C padded buffers, batched matmul, overflow tokens dropped",
    dropless=False,
    options={"capacity_factor": DEFAULT_CF},
    capacity=_capacity,
    validate=_validate,
))
