"""Routers and balance strategies. A router maps x_TD -> RouterOut(idx_TK, p_TK, counts_E, aux, ...).

Legend: T tokens, D model dim, E experts, K top-k, G groups, C capacity (slots per expert), S slots.
  scoring   softmax (Mixtral/Switch) | sigmoid (DeepSeek-V3); logits in fp32 (autocast off), / temperature
  kind      topk: each token its top-K experts | expert_choice: each expert its top-C tokens by score
            (Zhou et al. 2022), C = ceil(cf * T * K / E) with cf = capacity_factor or 1. Expert choice sees the
            whole batch, so in a causal LM a token's routing depends on later tokens: measure it, don't ship it.
  groups    n_group/topk_group: only experts of the best topk_group groups may be picked; a group's score
            is the sum of its best two (DeepSeek-V3)
  weights   p = s at the picked experts; norm_topk: p / sum_k p; then * route_scale
  capacity  capacity_factor cf (token choice): an expert keeps at most C = ceil(cf * T * K / E) slots, first
            come first served in rank-major order (every token's 1st choice before any 2nd choice, token order
            within a rank: GShard/Switch). A dropped slot contributes nothing (the token keeps its residual).
            null_expert: the dropped share goes to a null expert whose output is 0, so kept weights are NOT
            renormalised; without it (and with norm_topk) the kept weights are renormalised over kept slots.
  balance   none | aux: alpha * E * sum_i f_i * P_i, f_i = c_i / (T*K), P_i = mean_t s'_ti with s' = s / sum_e s
                       (= s for softmax) (Switch; DeepSeek-V3 normalises sigmoid scores the same way)
                 | bias: top-k on s + b, gate weight from s alone; after each optimizer step
                         b_i += u * sign(mean c - c_i) (Loss-Free Balancing, arXiv 2408.15664)
  z-loss    coef * mean_t logsumexp(logits_t)^2 (ST-MoE), independent of the balance choice
  ramps     aux_ramp_steps R: the aux coefficient is scaled by min(1, (step+1)/R); moe_warmup_steps W: the
            routed experts' gate weights by min(1, (step+1)/W) (MoE Transformer seed: gradual activation);
            step = optimizer steps taken, advanced by update_bias() and saved in the router's state_dict.
  score bias  score_bias b (DeepSeek-V3's e_score_correction_bias, fixed): top-k on s + b, weights from s;
            with balance = bias it is the bias's starting value
  jitter    jitter_noise j (Mixtral's router_jitter_noise): in training, logits from x * u with u uniform in
            [1 - j, 1 + j] per element (the router's input only; transformers' Mixtral block also feeds the
            jittered x to the experts)
Fixed routing (workload.routing uniform | zipf:<s> | hot:<k> | trace:<path>, fixed_idx) replaces the top-k
choice with a table drawn (or replayed from a recorded trace, moebench/traces.py) once per case and layer;
gate weights still come from the router's scores, so gradients reach it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moebench import traces
from moebench.spec import RouterSpec


@dataclass
class RouterOut:
    idx_TK: torch.Tensor          # expert of each slot; with tok_S set: shape (S, 1), slot s reads token tok_S[s]
    p_TK: torch.Tensor            # fp32 gate weights (0 at dropped slots)
    counts_E: torch.Tensor        # tokens routed to each expert (this call; demand, before any capacity drop)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # named losses, already scaled by their coef
    tok_S: torch.Tensor | None = None     # expert choice: the token of each slot (idx_TK/p_TK are per slot)
    dropped: torch.Tensor | None = None   # capacity: fraction of slots dropped; expert choice: of tokens unserved


def expert_probs(name: str, E: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-expert pick probabilities of a synthetic routing distribution (experts in random order)."""
    if name == "uniform":
        w = torch.ones(E, dtype=torch.float64)
    elif name.startswith("zipf:"):
        s = float(name[5:])
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    elif name.startswith("hot:"):
        # k hot experts hold 80% of the single-pick probability mass (each cold expert the rest evenly)
        k = int(name[4:])
        w = torch.ones(E, dtype=torch.float64)
        if 0 < k < E:
            w[:k] = 4.0 * (E - k) / k
    else:
        raise ValueError(f"not a synthetic routing: {name}")
    w = w[torch.randperm(E, generator=generator)]
    return w / w.sum()


def synthetic_idx(name: str, T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """Draw idx_TK: K distinct experts per token, sampled without replacement from expert_probs."""
    g = torch.Generator().manual_seed(seed)
    probs = expert_probs(name, E, g)
    return torch.multinomial(probs.float().expand(T, E), K, replacement=False, generator=g)


def is_fixed(routing: str) -> bool:
    """True when a workload's routing is a fixed table (synthetic or a trace), False for the router's own
    choice."""
    return routing != "learned"


def fixed_routing(routing: str, T: int, E: int, K: int, seed: int,
                  layer: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(idx_TK, p_TK or None) of a fixed routing. uniform | zipf:<s> | hot:<k>: drawn from seed
    (synthetic_idx; no weights). trace:<path>: the recorded choices (and gate weights, where recorded) of MoE
    layer `layer`, from a window picked by seed (traces.sample); the trace's E and K must be the model's."""
    if routing.startswith("trace:"):
        stored = routing[len("trace:"):]
        traces.check(stored, E, K)
        idx_TK, p_TK = traces.sample(traces.load(stored), T, seed, layer)
        return torch.from_numpy(idx_TK), None if p_TK is None else torch.from_numpy(p_TK)
    if not is_fixed(routing):
        raise ValueError("routing 'learned' has no fixed table: the router picks the experts")
    return synthetic_idx(routing, T, E, K, seed), None


def fixed_idx(routing: str, T: int, E: int, K: int, seed: int, layer: int = 0) -> torch.Tensor:
    """idx_TK of a fixed routing (fixed_routing without the weights): what the harness hands every backend."""
    return fixed_routing(routing, T, E, K, seed, layer)[0]


# ------------------------------------------------------------------------------------------- capacity
def capacity(T: int, K: int, E: int, capacity_factor: float) -> int:
    """Slots each expert keeps: C = ceil(cf * T * K / E), at least 1 (rounded to 1e-9 first so that
    1.1 * 100 / 11 is 10, not 11)."""
    return max(1, math.ceil(round(capacity_factor * T * K / E, 9)))


def slot_positions(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """pos_TK: the place of each slot in its expert's queue, rank-major (all 1st choices, then all 2nd
    choices, ...; token order within a rank). A slot is kept under capacity C iff pos < C. No host sync."""
    T, K = idx_TK.shape
    flat_S = idx_TK.t().reshape(-1)                                  # slot s = k * T + t
    order_S = torch.argsort(flat_S, stable=True)
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=idx_TK.device).scatter_add_(
        0, flat_S, torch.ones_like(flat_S))
    start_E = counts_E.cumsum(0) - counts_E
    pos_sorted = torch.arange(flat_S.numel(), device=idx_TK.device) - start_E[flat_S[order_S]]
    pos_S = torch.empty_like(pos_sorted).scatter_(0, order_S, pos_sorted)
    return pos_S.view(K, T).t()


def capacity_keep(idx_TK: torch.Tensor, n_experts: int, C: int) -> torch.Tensor:
    """keep_TK: True where the slot fits its expert's capacity C (first come, first served, rank-major)."""
    return slot_positions(idx_TK, n_experts) < C


def dropped_fraction(counts_E, C: int) -> float:
    """Dropped share of the slots under capacity C, from loads alone: expert i keeps min(c_i, C), whatever
    the priority order. counts_E: one load vector, or nested lists of them (summed over all)."""
    c = torch.as_tensor(counts_E, dtype=torch.float64)
    total = c.sum().item()
    return (c - C).clamp_min(0).sum().item() / total if total > 0 else 0.0


def ramp(step: int, n: int) -> float:
    """Linear ramp: min(1, (step + 1) / n); 1 when n = 0."""
    return 1.0 if n <= 0 else min(1.0, (step + 1) / n)


# --------------------------------------------------------------------------------------------- router
class Router(nn.Module):
    def __init__(self, spec: RouterSpec, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.spec, self.E, self.K = spec, n_experts, top_k
        self.wr_DE = nn.Parameter(torch.empty(d_model, n_experts))
        bias_E = torch.zeros(n_experts) if spec.score_bias is None else torch.tensor(spec.score_bias)
        self.register_buffer("bias_E", bias_E)                             # loss-free / fixed selection bias
        self.register_buffer("pending_counts_E", torch.zeros(n_experts))  # loads since the last bias update
        self.fixed_idx_TK: torch.Tensor | None = None                      # synthetic routing table
        self.step = 0                                                      # optimizer steps taken (ramps)

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = int(state["step"])

    def _ramp(self, n: int) -> float:
        """ramp(step, n), reading the step counter only when a ramp is set: torch.compile specialises on a Python
        int it reads, so a counter read every step would recompile every step."""
        return ramp(self.step, n) if n > 0 else 1.0

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.softmax(-1) if self.spec.scoring == "softmax" else logits_TE.sigmoid()

    def select(self, s_TE: torch.Tensor) -> torch.Tensor:
        biased = self.spec.balance == "bias" or self.spec.score_bias is not None
        sel_TE = s_TE + self.bias_E if biased else s_TE
        G, TG = self.spec.n_group, self.spec.topk_group
        if G > 1 and TG < G:
            T = sel_TE.shape[0]
            grp_TGe = sel_TE.view(T, G, self.E // G)
            top = min(2, grp_TGe.shape[-1])  # group score: sum of its best two (DeepSeek-V3)
            gscore_TG = grp_TGe.topk(top, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(gscore_TG, dtype=torch.bool).scatter_(
                1, gscore_TG.topk(TG, dim=-1).indices, True)
            sel_TE = grp_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, self.E)
        return sel_TE.topk(self.K, dim=-1).indices

    def forward(self, x_TD: torch.Tensor) -> RouterOut:
        sp = self.spec
        with torch.autocast(x_TD.device.type, enabled=False):  # router math in fp32 under bf16 autocast too
            xr_TD = x_TD.float()
            if sp.jitter_noise > 0 and self.training:
                xr_TD = xr_TD * torch.empty_like(xr_TD).uniform_(1.0 - sp.jitter_noise, 1.0 + sp.jitter_noise)
            logits_TE = (xr_TD @ self.wr_DE.float()) / sp.temperature
            s_TE = self.scores(logits_TE)
            aux = {}
            if sp.z_loss > 0 and self.training:
                aux["z_loss"] = sp.z_loss * torch.logsumexp(logits_TE, dim=-1).square().mean()
            if sp.kind == "expert_choice":
                return self._expert_choice(s_TE, aux)
            return self._token_choice(s_TE, aux)

    def _token_choice(self, s_TE: torch.Tensor, aux: dict) -> RouterOut:
        sp, (T, E) = self.spec, s_TE.shape
        if self.fixed_idx_TK is not None:
            idx_TK = self.fixed_idx_TK
        else:
            with torch.no_grad():
                idx_TK = self.select(s_TE.detach())
        p_TK = s_TE.gather(1, idx_TK)
        keep_TK = dropped = None
        if sp.capacity_factor is not None:
            keep_TK = capacity_keep(idx_TK, E, capacity(T, self.K, E, sp.capacity_factor))
            dropped = 1.0 - keep_TK.float().mean()
        if sp.norm_topk:
            kept = p_TK if keep_TK is None or sp.null_expert else p_TK * keep_TK
            p_TK = p_TK / kept.sum(-1, keepdim=True).clamp_min(1e-20)
        if keep_TK is not None:
            p_TK = p_TK * keep_TK
        p_TK = p_TK * (sp.route_scale * self._ramp(sp.moe_warmup_steps))
        counts_E = torch.zeros(E, dtype=torch.long, device=idx_TK.device).scatter_add_(
            0, idx_TK.reshape(-1), torch.ones_like(idx_TK.reshape(-1)))  # bincount without a host sync
        if sp.balance == "aux" and sp.aux_alpha > 0 and self.training:
            f_E = counts_E.float() / (T * self.K)
            P_E = (s_TE / s_TE.sum(-1, keepdim=True)).mean(0)
            coef = sp.aux_alpha * self._ramp(sp.aux_ramp_steps)
            aux["aux_loss"] = coef * E * (f_E * P_E).sum()
        if sp.balance == "bias" and self.training:
            self.pending_counts_E += counts_E.float()
        return RouterOut(idx_TK, p_TK, counts_E, aux, dropped=dropped)

    def _expert_choice(self, s_TE: torch.Tensor, aux: dict) -> RouterOut:
        """Each expert takes its top-C tokens by score; gate weight = score (no renormalisation)."""
        sp, (T, E) = self.spec, s_TE.shape
        C = min(T, capacity(T, self.K, E, sp.capacity_factor or 1.0))
        g_EC, tok_EC = s_TE.t().topk(C, dim=-1)
        tok_S = tok_EC.reshape(-1)
        idx_S1 = torch.arange(E, device=s_TE.device).repeat_interleave(C).unsqueeze(1)
        p_S1 = g_EC.reshape(-1, 1) * (sp.route_scale * self._ramp(sp.moe_warmup_steps))
        served_T = torch.zeros(T, device=s_TE.device).index_fill_(0, tok_S, 1.0)
        counts_E = torch.full((E,), C, dtype=torch.long, device=s_TE.device)
        return RouterOut(idx_S1, p_S1, counts_E, aux, tok_S=tok_S, dropped=1.0 - served_T.mean())

    @torch.no_grad()
    def update_bias(self) -> None:
        """Called once per optimizer step: advances the ramps' step and, for balance = 'bias', applies the
        loss-free update b_i += u * sign(mean c - c_i) with the loads since the last call."""
        self.step += 1
        if self.spec.balance != "bias":
            return
        c = self.pending_counts_E
        self.bias_E += self.spec.bias_rate * torch.sign(c.mean() - c)
        c.zero_()
