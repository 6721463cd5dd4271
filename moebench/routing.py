"""Routers and balance strategies. A router maps x_TD -> RouterOut(idx_TK, p_TK, aux, counts_E).

Legend: T tokens, D model dim, E experts, K top-k, G groups.
  scoring   softmax (Mixtral/Switch) | sigmoid (DeepSeek-V3); logits in fp32, divided by temperature
  groups    n_group/topk_group: only experts of the best topk_group groups may be picked (DeepSeek-V2/V3)
  balance   none | aux: alpha * E * sum_i f_i * P_i, f_i = c_i / (T*K), P_i = mean_t s_ti (Switch)
                 | bias: top-k on s + b, gate weight from s alone; after each step
                         b_i += u * sign(mean c - c_i) (Loss-Free Balancing, arXiv 2408.15664)
  z-loss    coef * mean_t logsumexp(logits_t)^2 (ST-MoE), independent of the balance choice
Synthetic routing (workload.routing uniform | zipf:<s> | hot:<k>) replaces the top-k choice with a fixed
table drawn once per case; gate weights still come from the router's scores, so gradients reach it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moebench.spec import RouterSpec


@dataclass
class RouterOut:
    idx_TK: torch.Tensor
    p_TK: torch.Tensor            # fp32 gate weights
    counts_E: torch.Tensor        # tokens routed to each expert (this call)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # named losses, already scaled by their coef


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


class Router(nn.Module):
    def __init__(self, spec: RouterSpec, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.spec, self.E, self.K = spec, n_experts, top_k
        self.wr_DE = nn.Parameter(torch.empty(d_model, n_experts))
        self.register_buffer("bias_E", torch.zeros(n_experts))           # loss-free balancing bias
        self.register_buffer("pending_counts_E", torch.zeros(n_experts))  # loads since the last bias update
        self.fixed_idx_TK: torch.Tensor | None = None                      # synthetic routing table

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.softmax(-1) if self.spec.scoring == "softmax" else logits_TE.sigmoid()

    def select(self, s_TE: torch.Tensor) -> torch.Tensor:
        sel_TE = s_TE + self.bias_E if self.spec.balance == "bias" else s_TE
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
        logits_TE = (x_TD.float() @ self.wr_DE.float()) / sp.temperature
        s_TE = self.scores(logits_TE)
        if self.fixed_idx_TK is not None:
            idx_TK = self.fixed_idx_TK
        else:
            with torch.no_grad():
                idx_TK = self.select(s_TE.detach())
        p_TK = s_TE.gather(1, idx_TK)
        if sp.norm_topk:
            p_TK = p_TK / p_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        p_TK = p_TK * sp.route_scale
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.E)
        aux = {}
        if sp.balance == "aux" and sp.aux_alpha > 0 and self.training:
            T = x_TD.shape[0]
            f_E = counts_E.float() / (T * self.K)
            P_E = (s_TE / s_TE.sum(-1, keepdim=True)).mean(0)
            aux["aux_loss"] = sp.aux_alpha * self.E * (f_E * P_E).sum()
        if sp.z_loss > 0 and self.training:
            aux["z_loss"] = sp.z_loss * torch.logsumexp(logits_TE, dim=-1).square().mean()
        if sp.balance == "bias" and self.training:
            self.pending_counts_E += counts_E.float()
        return RouterOut(idx_TK, p_TK, counts_E, aux)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step, called once per optimizer step: b_i += u * sign(mean c - c_i)."""
        if self.spec.balance != "bias":
            return
        c = self.pending_counts_E
        self.bias_E += self.spec.bias_rate * torch.sign(c.mean() - c)
        c.zero_()
