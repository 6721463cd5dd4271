"""ep-pipelined: ep-padded's exchange (no host sync), split into `chunks` chunks of tokens whose all-to-alls run
while the experts compute another chunk.

Legend: R ranks, r this rank, T tokens per rank, n chunks, Tc = T/n tokens per chunk, D model dim, El experts per
rank, C = Tc*min(K, El) rows per rank pair and chunk (ep.pad_blocks), Xc = R*C rows a rank receives per chunk.

Forward: dispatch(0) is issued; then per chunk c: issue dispatch(c+1), wait for dispatch(c), run the local experts on
chunk c, issue combine(c); at the end wait for each combine and sum each token's slots. Each exchange is
all_to_all_single(async_op=True) (NCCL: on its own stream beside the compute stream; gloo: on its own thread), so
the wire carries chunk c+1 while chunk c computes. Backward: two autograd nodes per exchange, _Issue (the collective
starts) and _Await (its result is needed); the backward of _Await issues the reverse exchange and the backward of
_Issue waits for it, so autograd's order (later nodes first) computes chunk c's expert backward while chunk c+1's
gradient exchange runs. Only the waits are timed (ep.recording, kinds dispatch_wait / combine_wait /
dispatch_bwd_wait / combine_bwd_wait): the record's a2a time is the EXPOSED communication, the part the pipeline
did not hide (and no GB/s is derived from it: the bytes are counted under dispatch / combine, the waits apart).
The local expert ids of every chunk go in one small exchange first (exposed, timed as dispatch_ids).

Parity, padding, dropless: as ep-padded, per chunk (the chunks only reorder the work).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from implementations import ep
from moebench.registry import Backend, register


class _Box:
    """What one exchange's two autograd nodes share: its splits, group and kind; the forward and backward handles
    and the backward's receive buffers."""

    def __init__(self, C: int, R: int, group, kind: str):
        self.split, self.group, self.kind, self.R = [C] * R, group, kind, R
        self.work = self.work_bwd = None
        self.grads: tuple = ()


def _issue(box: _Box, xs, kind: str):
    """Start all_to_all_single of each x (equal splits) without waiting; returns (outputs, handles)."""
    ep._note_bytes(kind, xs, box.split, box.group)
    outs, works = [], []
    for x in xs:
        out = x.new_empty(x.shape)  # contiguous, whatever x's strides (a gradient may be expanded)
        if box.R == 1:
            out.copy_(x)
        else:
            works.append(dist.all_to_all_single(out, x.contiguous(), box.split, box.split, group=box.group,
                                                async_op=True))
        outs.append(out)
    return tuple(outs), works


def _wait(box: _Box, works, kind: str) -> None:
    with ep._span(kind + "_wait"):  # the exposed part only: not the exchange's duration, so no GB/s from it
        for w in works:
            w.wait()


class _Issue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, *xs):
        ctx.box = box
        outs, box.work = _issue(box, xs, box.kind)
        return outs

    @staticmethod
    def backward(ctx, *dys):
        _wait(ctx.box, ctx.box.work_bwd, ctx.box.kind + "_bwd")
        return (None, *ctx.box.grads)


class _Await(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, *outs):
        ctx.box = box
        _wait(box, box.work, box.kind)
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *dys):
        box = ctx.box
        box.grads, box.work_bwd = _issue(box, dys, box.kind + "_bwd")
        return (None, *box.grads)  # not yet filled: _Issue.backward waits before anyone reads them


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, local="grouped_mm", chunks=2):
    group, R, r, El, local_fwd, w1, w2 = ep._setup(x_TD, w1_EDF2, w2_EFD, local)
    T = idx_TK.shape[0]
    if T % chunks:
        raise ValueError(f"ep-pipelined: option chunks ({chunks}) must divide the tokens per rank ({T})")
    ep._check_same_tokens(T, group, R)
    Tc = T // chunks
    parts = [ep.pad_blocks(x_TD[c * Tc:(c + 1) * Tc], idx_TK[c * Tc:(c + 1) * Tc], p_TK[c * Tc:(c + 1) * Tc], R, El)
             for c in range(chunks)]
    C = parts[0][-1]
    # every chunk's local expert ids in one exchange: rank q's block is (chunk, row)-major
    lid_RnC = torch.stack([pt[2].view(R, C) for pt in parts], dim=1)
    counts_Rn = torch.stack([pt[5] for pt in parts], dim=1)
    with ep._span("dispatch_ids"):
        (lid_RnC,) = ep._a2a((lid_RnC.reshape(-1),), [chunks * C] * R, [chunks * C] * R, group, None, "dispatch_ids")
    lid_RnC = lid_RnC.view(R, chunks, C)
    ep._note_rows(counts_Rn.sum(), counts_Rn.sum(1), None, r, padded=chunks * R * C)
    # the pipeline: dispatch(c+1) on the wire while chunk c computes; combine(c) on the wire while c+1 computes
    dispatch = [_Box(C, R, group, "dispatch") for _ in range(chunks)]
    combine = [_Box(C, R, group, "combine") for _ in range(chunks)]
    sent = [None] * chunks
    sent[0] = _Issue.apply(dispatch[0], parts[0][0], parts[0][1])
    back = []
    for c in range(chunks):
        if c + 1 < chunks:
            sent[c + 1] = _Issue.apply(dispatch[c + 1], parts[c + 1][0], parts[c + 1][1])
        xr_XD, pr_X = _Await.apply(dispatch[c], *sent[c])
        yr_XD = ep._experts(local_fwd, xr_XD, lid_RnC[:, c].reshape(-1), pr_X, w1, w2)
        back.append(_Issue.apply(combine[c], yr_XD))
    ys = []
    for c in range(chunks):
        (ys_XD,) = _Await.apply(combine[c], *back[c])
        row_S, tok_S = parts[c][3], parts[c][4]
        ys.append(torch.zeros_like(x_TD[:Tc]).index_add_(0, tok_S, ys_XD[row_S]))
    return torch.cat(ys)


def _validate(options: dict) -> str | None:
    n = options.get("chunks", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"chunks must be an integer >= 1 (tokens per rank split into that many pipelined chunks), got {n!r}"
    return None


register(Backend(
    name="ep-pipelined",
    forward=forward,
    description="expert parallel, ep-padded's exchange in `chunks` pipelined chunks: one chunk's all-to-all runs "
                "while the experts compute another (async all_to_all_single); a2a time = exposed communication "
                "(run with --nproc N)",
    needs_process_group=True,
    host_sync=None,
    options={"local": "grouped_mm", "chunks": 2},
    available=ep._available,
    validate=_validate,
))
