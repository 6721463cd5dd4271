"""Routing metadata shared by the sorted backends: which slot goes where, built on the device.

Legend: T tokens, K top-k, E experts, S = T*K slots.  Slot s = t*K + k.
"""
import torch


def sort_by_expert(idx_TK: torch.Tensor, n_experts: int):
    """Returns (order_S, tok_S, counts_E, offs_E): slots sorted by expert (stable, so token order is kept
    within an expert), the token each sorted slot reads, tokens per expert and the int32 end offsets."""
    flat_S = idx_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    tok_S = torch.div(order_S, idx_TK.shape[1], rounding_mode="floor")
    # scatter_add, not bincount: CUDA bincount reads the max index back to the host (a hidden sync)
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=idx_TK.device).scatter_add_(
        0, flat_S, torch.ones_like(flat_S))
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_S, tok_S, counts_E, offs_E
