"""The one decoder-only transformer every backend shares: RMSNorm, RoPE, GQA attention, MoE FFN (router ->
backend -> weighted combine) with optional shared experts (optionally gated per token, Qwen2-MoE's
shared_expert_gate) and first dense layers, tied embeddings, LM loss plus the routers' aux losses. Weights
live here with the canonical shapes (w1_EDF2 = [gate | up], w2_EFD, wr_DE), so any backend runs on the same
parameters; the expert weights' memory order is the backend's `weight_layout`
(moebench.registry.WEIGHT_LAYOUTS), the values are the same either way.

Legend: B batch, S seq, T = B*S tokens, D model dim, H heads, Hkv KV heads, Dh head dim, F expert hidden,
E experts, K top-k, V vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moebench import components
from moebench.registry import Backend
from moebench.routing import Router, RouterOut
from moebench.spec import ModelSpec


def expert_weights(E: int, D: int, Fh: int, layout: str = "canonical", **factory) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (w1_EDF2, w2_EFD) with the canonical shapes, stored in `layout`'s memory order."""
    if layout == "canonical":
        return torch.empty(E, D, 2 * Fh, **factory), torch.empty(E, Fh, D, **factory)
    if layout == "linear":  # nn.Linear-style (out, in) storage, viewed transposed
        return torch.empty(E, 2 * Fh, D, **factory).transpose(1, 2), torch.empty(E, D, Fh, **factory).transpose(1, 2)
    raise ValueError(f"weight layout '{layout}' is not one of canonical, linear")


def in_layout(w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of (w1_EDF2, w2_EFD) with the same values, stored in `layout`'s memory order."""
    E, D, F2 = w1_EDF2.shape
    w1, w2 = expert_weights(E, D, F2 // 2, layout, device=w1_EDF2.device, dtype=w1_EDF2.dtype)
    return w1.copy_(w1_EDF2), w2.copy_(w2_EFD)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (shared experts merged into one, and the first dense layers)."""

    def __init__(self, D: int, Fh: int):
        super().__init__()
        self.w1_DF2 = nn.Parameter(torch.empty(D, 2 * Fh))
        self.w2_FD = nn.Parameter(torch.empty(Fh, D))

    def forward(self, x_TD):
        g_TF, u_TF = (x_TD @ self.w1_DF2).chunk(2, dim=-1)
        return (F.silu(g_TF) * u_TF) @ self.w2_FD


def rope_cos_sin(S: int, Dh: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh))
    ang_SDh2 = torch.outer(torch.arange(S, device=device, dtype=torch.float32), inv_freq)
    return ang_SDh2.cos().to(dtype), ang_SDh2.sin().to(dtype)


def apply_rope(x_BHSDh, cos, sin):
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        D, H, Hkv, Dh = spec.d_model, spec.n_heads, spec.kv_heads, spec.head_dim
        self.H, self.Hkv, self.Dh, self.theta = H, Hkv, Dh, spec.rope_theta
        self.wqkv_DX = nn.Parameter(torch.empty(D, (H + 2 * Hkv) * Dh))
        self.wo_XD = nn.Parameter(torch.empty(H * Dh, D))
        self.attend = components.attention_fn(spec.attention)

    def forward(self, x_BSD):
        B, S, _ = x_BSD.shape
        qkv = x_BSD @ self.wqkv_DX
        q, k, v = qkv.split([self.H * self.Dh, self.Hkv * self.Dh, self.Hkv * self.Dh], dim=-1)
        q = q.view(B, S, self.H, self.Dh).transpose(1, 2)
        k = k.view(B, S, self.Hkv, self.Dh).transpose(1, 2)
        v = v.view(B, S, self.Hkv, self.Dh).transpose(1, 2)
        cos, sin = rope_cos_sin(S, self.Dh, self.theta, x_BSD.device, x_BSD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.Hkv != self.H:
            k = k.repeat_interleave(self.H // self.Hkv, dim=1)
            v = v.repeat_interleave(self.H // self.Hkv, dim=1)
        o_BHSDh = self.attend(q, k, v)
        return o_BHSDh.transpose(1, 2).reshape(B, S, self.H * self.Dh) @ self.wo_XD


class MoE(nn.Module):
    """Router -> backend -> (+ shared experts) -> scale. Owns every expert weight; the backend owns none."""

    def __init__(self, spec: ModelSpec, backend: Backend, backend_options: dict | None = None):
        super().__init__()
        D, Fh, E = spec.d_model, spec.d_expert, spec.n_experts
        self.backend, self.options, self.scale = backend, dict(backend_options or {}), spec.moe_output_scale
        self.router = Router(spec.router, D, E, spec.top_k)
        w1_EDF2, w2_EFD = expert_weights(E, D, Fh, backend.weight_layout)
        self.w1_EDF2, self.w2_EFD = nn.Parameter(w1_EDF2), nn.Parameter(w2_EFD)
        self.shared = SwiGLU(D, spec.shared_hidden) if spec.n_shared_experts else None
        # Qwen2-MoE: shared-expert output * sigmoid(x @ w_D1) per token (a parameter only when set: the seeded
        # init draws parameters in name order, so layers without the gate keep their weights)
        self.shared_gate_D1 = nn.Parameter(torch.empty(D, 1)) if spec.shared_gate else None
        self.n_folded = 0  # shared experts folded into w1/w2 as experts E.. (fold_shared)

    @torch.no_grad()
    def fold_shared(self) -> None:
        """MoMoE's shared experts: the shared MLP's hidden units, in n_shared chunks of F, become experts
        E..E+n_shared-1 of w1/w2, which every token is routed to with weight 1. The same function (SwiGLU is a
        sum over hidden units); called once after the weights are drawn, so the values match an unfolded layer."""
        if self.shared is None or self.n_folded:
            return
        if self.shared_gate_D1 is not None:
            raise ValueError("fold_shared: the shared experts are gated per token (shared_gate); folded in "
                             "as always-on experts of weight 1 they would lose the gate")
        if self.router.spec.kind == "expert_choice":
            raise ValueError("fold_shared: an expert-choice router picks tokens per expert; the always-on shared "
                             "experts cannot be folded into it")
        E, D, F2 = self.w1_EDF2.shape
        Fh = F2 // 2
        Fs = self.shared.w2_FD.shape[0]
        if Fs % Fh:
            raise ValueError(f"fold_shared: the shared hidden size ({Fs}) is not a whole number of experts of "
                             f"d_expert {Fh}")
        n_s = Fs // Fh
        g_DF, u_DF = self.shared.w1_DF2.chunk(2, dim=-1)
        w1_sDF2 = torch.cat([g_DF.reshape(D, n_s, Fh), u_DF.reshape(D, n_s, Fh)], dim=-1).transpose(0, 1)
        w2_sFD = self.shared.w2_FD.reshape(n_s, Fh, D)
        w1, w2 = in_layout(torch.cat([self.w1_EDF2, w1_sDF2.to(self.w1_EDF2.dtype)]),
                           torch.cat([self.w2_EFD, w2_sFD.to(self.w2_EFD.dtype)]), self.backend.weight_layout)
        self.w1_EDF2, self.w2_EFD = nn.Parameter(w1), nn.Parameter(w2)
        self.shared, self.n_folded = None, n_s

    def forward(self, x_TD) -> tuple[torch.Tensor, RouterOut]:
        r = self.router(x_TD)
        # under autocast the backend gets its inputs in the autocast dtype (not every op it uses autocasts)
        dev = x_TD.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype
        w1, w2, xb_TD = self.w1_EDF2.to(dt), self.w2_EFD.to(dt), x_TD.to(dt)
        if r.tok_S is None:
            idx_TK, p_TK = r.idx_TK, r.p_TK.to(dt)
            if self.n_folded:  # every token also to the folded shared experts, weight 1
                E, T, n = w1.shape[0] - self.n_folded, idx_TK.shape[0], self.n_folded
                idx_TK = torch.cat([idx_TK, torch.arange(E, E + n, device=idx_TK.device,
                                                          dtype=idx_TK.dtype).expand(T, n)], dim=1)
                p_TK = torch.cat([p_TK, p_TK.new_ones(T, n)], dim=1)
            y_TD = self.backend.forward(xb_TD, idx_TK, p_TK, w1, w2, **self.options)
        else:  # expert choice: slots are (token, expert) pairs; run them as single-expert rows, add back
            y_SD = self.backend.forward(xb_TD[r.tok_S], r.idx_TK, r.p_TK.to(dt), w1, w2, **self.options)
            y_TD = torch.zeros_like(xb_TD).index_add_(0, r.tok_S, y_SD)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate_D1 is not None:
                s_TD = s_TD * torch.sigmoid(x_TD @ self.shared_gate_D1)
            y_TD = y_TD + s_TD
        return (y_TD * self.scale if self.scale != 1.0 else y_TD), r


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, backend: Backend, options: dict, dense: bool):
        super().__init__()
        self.ln1 = components.norm(spec.norm, spec.d_model, spec.norm_eps)
        self.ln2 = components.norm(spec.norm, spec.d_model, spec.norm_eps)
        self.attn = Attention(spec)
        self.ffn = SwiGLU(spec.d_model, spec.dense_hidden) if dense else MoE(spec, backend, options)

    def forward(self, x_BSD):
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD))
        h_TD = self.ln2(x_BSD).reshape(-1, x_BSD.shape[-1])
        if isinstance(self.ffn, MoE):
            y_TD, r = self.ffn(h_TD)
        else:
            y_TD, r = self.ffn(h_TD), None
        return x_BSD + y_TD.view_as(x_BSD), r


class MoEModel(nn.Module):
    def __init__(self, spec: ModelSpec, backend: Backend, backend_options: dict | None = None, seed: int = 0):
        super().__init__()
        self.spec = spec
        self.embed_VD = nn.Parameter(torch.empty(spec.vocab_size, spec.d_model))
        self.blocks = nn.ModuleList(Block(spec, backend, backend_options or {}, i < spec.first_dense_layers)
                                    for i in range(spec.n_layers))
        self.ln_f = components.norm(spec.norm, spec.d_model, spec.norm_eps)
        self.head_DV = None if spec.tie_embeddings else nn.Parameter(torch.empty(spec.d_model, spec.vocab_size))
        init_weights(self, seed)
        if backend.folds_shared:
            for m in self.moe_layers:
                m.fold_shared()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, ids_BS, labels_BS=None):
        x_BSD = F.embedding(ids_BS, self.embed_VD)
        routes = []
        for blk in self.blocks:
            x_BSD, r = blk(x_BSD)
            if r is not None:
                routes.append(r)
        h_BSD = self.ln_f(x_BSD)
        logits_BSV = h_BSD @ (self.embed_VD.t() if self.head_DV is None else self.head_DV)
        out = {"logits": logits_BSV, "routes": routes}
        if labels_BS is not None:
            lm = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), labels_BS[:, 1:].flatten())
            aux = sum((v for r in routes for v in r.aux.values()), torch.zeros((), device=lm.device))
            out |= {"lm_loss": lm, "aux_loss": aux, "loss": lm + aux}
        return out

    def update_router_biases(self) -> None:
        for m in self.moe_layers:
            m.router.update_bias()


@torch.no_grad()
def init_weights(model: MoEModel, seed: int, std: float = 0.02) -> None:
    """Deterministic init from a seed, independent of the backend: same seed, same weights, any backend.
    Normal(0, 0.02); output projections scaled by 1/sqrt(2 L) (GPT-2); norm scales 1."""
    dev = next(model.parameters()).device  # drawn where the model lives: fast, and the same on every backend
    g = torch.Generator(device=dev).manual_seed(seed)
    out_std = std / math.sqrt(2 * model.spec.n_layers)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:  # norm scales
            p.fill_(1.0)
        else:
            scale = out_std if name.endswith(("wo_XD", "w2_EFD", "w2_FD")) else std
            p.copy_(torch.randn(p.shape, generator=g, device=dev) * scale)


def build_layer(spec: ModelSpec, backend: Backend, options: dict | None = None, seed: int = 0) -> MoE:
    """The MoE layer alone (layer-level workloads), initialised like the model's layers."""
    layer = MoE(spec, backend, options)
    dev = layer.w1_EDF2.device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g, device=dev) / math.sqrt(p.shape[-2] if p.dim() > 1 else 1))
    if backend.folds_shared:
        layer.fold_shared()
    return layer
