"""shuffle: MoEForge's token shuffling. Sort slots by expert, run each expert on its contiguous slice,
weight, and index_add_ back to token order. One host sync (counts.tolist()) per call, as in MoEForge.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, S = T*K slots.
"""
import torch

from implementations.naive import swiglu_expert
from implementations.routing_meta import sort_by_expert
from moebench.registry import Backend, register


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    E = w1_EDF2.shape[0]
    order_S, tok_S, counts_E, _ = sort_by_expert(idx_TK, E)
    xs_SD = x_TD[tok_S]
    outs = [swiglu_expert(xs_ND, w1_EDF2[e], w2_EFD[e])
            for e, xs_ND in enumerate(torch.split(xs_SD, counts_E.tolist())) if xs_ND.shape[0] > 0]
    o_SD = torch.cat(outs) * p_TK.reshape(-1)[order_S].unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, o_SD)


register(Backend(
    name="shuffle",
    forward=forward,
    description="MoEForge token shuffling: sort by expert, contiguous slices, index_add_ back",
    host_sync="counts_E.tolist() splits the rows on the host",
))
