"""ep: expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU), the torchtitan / Megatron
all-to-all token dispatcher.

Legend: R ranks in the group, r this rank, T this rank's tokens, D model dim, F expert hidden, E experts (all
ranks), El = E/R experts per rank, K top-k, S = T*K routed slots this rank sends, N rows it receives;
ep-dedup: P (rank, token) pairs this rank sends, V slots its experts compute.

Data parallel over tokens, expert parallel over experts. Rank r owns experts [r*El, (r+1)*El). The layer hands
every backend the FULL w1_EDF2 / w2_EFD: in the benchmark every rank holds the same replicated weights (so parity
with `naive` on the unsharded layer is exact), and ep reads only its own shard, so the weight gradients outside
that shard are zero on this rank. One step:
  1. dispatch: sort this rank's slots by expert (= by destination rank, then local expert); exchange the per-expert
     counts (all_to_all_single on a counts tensor); the split sizes go to the host (one .tolist() sync per call:
     inherent to an uneven all-to-all, and part of the measured cost); all_to_all_single with uneven splits sends
     the token rows and their gate weights.
  2. local experts: the `local` backend (grouped_mm; naive or shuffle on CPU) runs the received rows, each as a
     one-slot token routed to its local expert with its gate weight.
  3. combine: the reverse all_to_all_single brings the weighted outputs home; index_add_ sums each token's slots.
Both exchanges are autograd Functions whose backward is the reverse exchange, so gradients of x, p, w1 and w2 flow
through them. (torch.distributed.nn.functional.all_to_all_single would do too, but torch 2.13 deprecates it, so
the exchange is written out here, a dozen lines.)

ep-dedup (the DeepEP way) sends each token once to each rank that holds any of its K experts, with its K gate
weights and per slot the local expert id there (-1: elsewhere); the receiver expands rows to its slots, runs the
local backend, sums a row's slots, and sends one row back per (token, rank). With K=8 over 2 ranks that is about
2 rows per token on the wire instead of 8 (1 instead of 4 remote), for two more local gather/scatter passes.

ep-padded exchanges without the host: every rank sends every rank a block of C = T * min(K, El) rows (the most
slots T tokens can route to one rank's El experts), padded with zero rows of gate weight 0, so both
all_to_all_singles have equal splits known from the shapes and nothing waits on the host (a CUDA graph can capture
the step). The price is the padding, on the wire and in the local experts, which run on all R*C received rows: of
R*C rows a rank receives only its routed slots are real (a padding fraction of 1 - 1/R under uniform routing once
El >= K; the record's ep.padding_frac says it per case). Dropless by construction: the pad is the worst case.

A process group must be initialised (moebench.distributed does it under torchrun; `use_group` picks the group of a
case that spans fewer ranks than were launched). Exchange timings are collected only inside `recording(...)`: CUDA
events (or perf_counter on CPU) around each exchange, read after the timed loop, so no sync is added.
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from implementations.routing_meta import sort_by_expert
from moebench.registry import Backend, UnknownName, all_backends, register

_GROUP = None  # the case's process group (moebench.distributed sets it); None: the default group


@contextmanager
def use_group(group):
    global _GROUP
    old, _GROUP = _GROUP, group
    try:
        yield group
    finally:
        _GROUP = old


def current_group():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ep needs an initialised torch.distributed process group: run it with "
                           "`moebench run --suite ep --nproc N` (torchrun), not in a single process")
    return _GROUP if _GROUP is not None else dist.group.WORLD


def experts_per_rank(E: int, R: int) -> int:
    if E % R:
        valid = ", ".join(str(d) for d in range(1, E + 1) if E % d == 0)
        raise ValueError(f"ep: n_experts ({E}) must be divisible by the number of ranks ({R}) to shard experts "
                         f"evenly; valid rank counts for E={E}: {valid}")
    return E // R


@functools.cache
def _local_backend(name: str, device: str, dtype: str):
    valid = {n: b for n, b in all_backends().items() if not b.needs_process_group and b.dropless}
    if name not in valid:
        raise ValueError(f"ep: option local: {UnknownName('local backend', name, valid)}")
    why = valid[name].why_not(device, dtype)
    if why:
        raise RuntimeError(f"ep: local backend '{name}' cannot run here: {why}")
    return valid[name]


# ------------------------------------------------------------------------------------------ exchange timings
class Recorder:
    """Exchange spans (step, kind, start, end) and rows moved per call; `step` is set by the caller (-1: not
    counted). CUDA events are read once, after the caller has synchronised."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.step = -1
        self.spans: list = []
        # (step, rows received, rows sent to other ranks, rows received from other ranks, rows received with padding)
        self.rows: list = []
        self.bytes: list = []  # (step, kind, bytes this rank sent to other ranks in that exchange)

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def read(self) -> list[tuple[int, str, float]]:
        """The spans in ms, after the timing; row counts kept as device tensors become numbers here too."""
        if self.cuda:
            torch.cuda.synchronize()
        self.rows = [tuple(float(v) if torch.is_tensor(v) else v for v in row) for row in self.rows]
        if self.cuda:
            return [(s, k, a.elapsed_time(b)) for s, k, a, b in self.spans]
        return [(s, k, (b - a) * 1e3) for s, k, a, b in self.spans]


_REC: Recorder | None = None


@contextmanager
def recording(device: torch.device):
    global _REC
    _REC = Recorder(torch.device(device))
    try:
        yield _REC
    finally:
        _REC = None


@contextmanager
def _span(kind: str):
    rec = _REC
    if rec is None or _capturing():  # a CUDA graph replays no host code: its exchanges are not timed one by one
        yield
        return
    step, start = rec.step, rec.now()
    yield
    rec.spans.append((step, kind, start, rec.now()))


# ------------------------------------------------------------------------------------------------ exchange
def _note_bytes(kind: str, xs, in_splits, group) -> None:
    """Bytes this rank sends to OTHER ranks in one exchange (its own block stays home), known from the splits."""
    if _REC is None or _capturing() or len(in_splits) == 1:
        return
    mine = in_splits[dist.get_rank(group)]
    n = sum((sum(in_splits) - mine) * (x[0].numel() if x.dim() > 1 else 1) * x.element_size() for x in xs)
    _REC.bytes.append((_REC.step, kind, n))


def _a2a(xs, out_splits, in_splits, group, kind, bytes_kind=None):
    _note_bytes(kind or bytes_kind, xs, in_splits, group)
    outs = []
    with _span(kind) if kind else nullcontext():
        for x in xs:
            out = x.new_empty((sum(out_splits), *x.shape[1:]))
            if len(in_splits) == 1:  # a one-rank group: the exchange is a local copy
                out.copy_(x)
            else:
                dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
            outs.append(out)
    return tuple(outs)


class _Exchange(torch.autograd.Function):
    """all_to_all_single of one or more row tensors with the same uneven splits; backward sends the gradients
    back along the reversed splits. One autograd node per exchange, so every rank issues its backward
    collectives in the same order."""

    @staticmethod
    def forward(ctx, meta, *xs):
        out_splits, in_splits, group, kind = meta
        ctx.meta = (in_splits, out_splits, group, kind + "_bwd")
        return _a2a(xs, out_splits, in_splits, group, kind)

    @staticmethod
    def backward(ctx, *dys):
        return (None, *_a2a(dys, *ctx.meta))


def _exchange_equal(x_N: torch.Tensor, R: int, group) -> torch.Tensor:
    """all_to_all_single with equal splits (N/R entries to every rank); no autograd (counts, ids)."""
    out = torch.empty_like(x_N)
    if R == 1:
        return out.copy_(x_N)
    _note_bytes("counts", (x_N,), [x_N.numel() // R] * R, group)
    dist.all_to_all_single(out, x_N, group=group)
    return out


def _setup(x_TD, w1_EDF2, w2_EFD, local):
    group = current_group()
    R, r = dist.get_world_size(group), dist.get_rank(group)
    El = experts_per_rank(w1_EDF2.shape[0], R)
    local_fwd = _local_backend(local, x_TD.device.type, str(x_TD.dtype).replace("torch.", "")).forward
    w1, w2 = (w1_EDF2, w2_EFD) if R == 1 else (w1_EDF2[r * El:(r + 1) * El], w2_EFD[r * El:(r + 1) * El])
    return group, R, r, El, local_fwd, w1, w2


def _experts(local_fwd, x_VD, lid_V, p_V, w1, w2):
    """This rank's experts on V one-slot rows (row v -> local expert lid_V[v], gate weight p_V[v])."""
    if x_VD.shape[0]:
        return local_fwd(x_VD, lid_V[:, None], p_V[:, None], w1, w2)
    # nothing routed here: stay in the autograd graph (zero gradients) so this rank joins the backward exchanges
    return x_VD * p_V[:, None] + (w1.sum() + w2.sum()) * 0


def _note_rows(N, send_R, recv_R, r: int, padded: int = 0) -> None:
    """Rows this step moved: ints, or (ep-padded) device tensors that Recorder.read() turns into numbers after the
    timing. `padded`: rows received including padding (0: no padding). recv_R None (ep-padded, ep-pipelined: no
    exchange of counts inside the step just for this): N and the remote rows are this rank's SENT real rows, whose
    means over the ranks equal the received ones (every row sent is received)."""
    if _REC is not None and not _capturing():
        sent_remote = (send_R.sum() if torch.is_tensor(send_R) else sum(send_R)) - send_R[r]
        _REC.rows.append((_REC.step, N, sent_remote, sent_remote if recv_R is None else N - recv_R[r], padded or N))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, local="grouped_mm"):
    group, R, r, El, local_fwd, w1, w2 = _setup(x_TD, w1_EDF2, w2_EFD, local)
    # 1. dispatch: slots sorted by expert are sorted by destination rank, then by local expert
    order_S, tok_S, counts_E, _ = sort_by_expert(idx_TK, w1_EDF2.shape[0])
    with _span("counts"):  # recv_RL[s, e]: rows source s sends for my local expert e
        recv_RL = _exchange_equal(counts_E, R, group).view(R, El)
        sizes = torch.cat([counts_E.view(R, El).sum(1), recv_RL.sum(1)]).tolist()  # the host sync
    send_R, recv_R = sizes[:R], sizes[R:]
    N = sum(recv_R)
    xr_ND, pr_N = _Exchange.apply((recv_R, send_R, group, "dispatch"), x_TD[tok_S], p_TK.reshape(-1)[order_S])
    _note_rows(N, send_R, recv_R, r)
    # 2. local experts: rows from each source arrive sorted by local expert
    lid_N = torch.arange(El, device=x_TD.device).repeat(R).repeat_interleave(recv_RL.reshape(-1), output_size=N)
    yr_ND = _experts(local_fwd, xr_ND, lid_N, pr_N, w1, w2)
    # 3. combine: rows go home in the order they left; each token sums its K slots
    (ys_SD,) = _Exchange.apply((send_R, recv_R, group, "combine"), yr_ND)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, ys_SD)


def forward_dedup(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, local="grouped_mm"):
    group, R, r, El, local_fwd, w1, w2 = _setup(x_TD, w1_EDF2, w2_EFD, local)
    T, K = idx_TK.shape
    dev = x_TD.device
    # 1. dispatch: pairs (rank, token) where the token has at least one expert on that rank, rank-major
    dest_TK = torch.div(idx_TK, El, rounding_mode="floor")
    hit_RT = torch.zeros(R, T, dtype=torch.bool, device=dev)
    hit_RT[dest_TK, torch.arange(T, device=dev)[:, None].expand(T, K)] = True
    counts_R2 = torch.stack([hit_RT.sum(1), torch.bincount(dest_TK.reshape(-1), minlength=R)], dim=1)
    with _span("counts"):  # per rank: rows (tokens) and slots
        recv_R2 = _exchange_equal(counts_R2.reshape(-1), R, group).view(R, 2)
        sizes = torch.cat([counts_R2[:, 0], recv_R2[:, 0], recv_R2[:, 1].sum().view(1)]).tolist()  # host sync
    send_R, recv_R, V = sizes[:R], sizes[R:2 * R], sizes[-1]
    N = sum(recv_R)
    pair_P = torch.argsort((~hit_RT).reshape(-1).to(torch.int8), stable=True)[:sum(send_R)]
    r_P, t_P = pair_P // T, pair_P % T
    lid_PK = torch.where(dest_TK[t_P] == r_P[:, None], idx_TK[t_P] % El, -1)
    with _span("dispatch_ids"):
        (lid_NK,) = _a2a((lid_PK,), recv_R, send_R, group, None, "dispatch_ids")
    xr_ND, pr_NK = _Exchange.apply((recv_R, send_R, group, "dispatch"), x_TD[t_P], p_TK[t_P])
    _note_rows(N, send_R, recv_R, r)
    # 2. local experts on this rank's V slots (row n, slot k), then each row sums its slots
    slot_V = torch.argsort((lid_NK < 0).reshape(-1).to(torch.int8), stable=True)[:V]
    n_V = slot_V // K
    yv_VD = _experts(local_fwd, xr_ND[n_V], lid_NK.reshape(-1)[slot_V], pr_NK.reshape(-1)[slot_V], w1, w2)
    yr_ND = torch.zeros_like(xr_ND).index_add_(0, n_V, yv_VD)
    # 3. combine: one row per (token, rank) goes home; each token sums its rows
    (ys_PD,) = _Exchange.apply((send_R, recv_R, group, "combine"), yr_ND)
    return torch.zeros_like(x_TD).index_add_(0, t_P, ys_PD)


_SAME_T: set = set()  # (group, T) pairs checked once: every rank of the group has T tokens


def _check_same_tokens(T: int, group, R: int) -> None:
    """ep-padded's block size comes from T, so every rank must have the same T. Checked the first time a group sees
    a T (one all_gather: a host sync, in warm-up, never again for that T), so a mismatch is an error, not a hang."""
    if R == 1 or (group, T) in _SAME_T:
        return
    Ts = [None] * R
    dist.all_gather_object(Ts, T, group=group)
    if len(set(Ts)) > 1:
        raise ValueError(f"ep-padded: every rank needs the same number of tokens (its all-to-all blocks are sized "
                         f"from it); the ranks have {Ts}")
    _SAME_T.add((group, T))


def pad_blocks(x_TD, idx_TK, p_TK, R: int, El: int):
    """ep-padded's send buffers: slots sorted by expert; slot s goes to rank dest_S[s], at row row_S[s] of the
    R*C rows (C = T*min(K, El) per destination: the worst case, so nothing is ever dropped). Padding rows are zeros
    with gate weight 0 and local expert 0. Returns (x_CD, p_C, lid_C, row_S, tok_S, counts_R, C)."""
    T, K = idx_TK.shape
    D, dev = x_TD.shape[1], x_TD.device
    C = T * min(K, El)
    order_S, tok_S, counts_E, _ = sort_by_expert(idx_TK, R * El)
    e_S = idx_TK.reshape(-1)[order_S]
    dest_S = torch.div(e_S, El, rounding_mode="floor")
    counts_R = counts_E.view(R, El).sum(1)
    start_R = torch.cumsum(counts_R, 0) - counts_R
    row_S = dest_S * C + torch.arange(order_S.numel(), device=dev) - start_R[dest_S]
    x_CD = x_TD.new_zeros(R * C, D).index_put((row_S,), x_TD[tok_S])
    p_C = p_TK.new_zeros(R * C).index_put((row_S,), p_TK.reshape(-1)[order_S])
    lid_C = torch.zeros(R * C, dtype=torch.int64, device=dev).index_put((row_S,), e_S % El)
    return x_CD, p_C, lid_C, row_S, tok_S, counts_R, C


def forward_padded(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, local="grouped_mm"):
    group, R, r, El, local_fwd, w1, w2 = _setup(x_TD, w1_EDF2, w2_EFD, local)
    _check_same_tokens(idx_TK.shape[0], group, R)
    # 1. dispatch: fixed blocks of C rows to every rank
    x_CD, p_C, lid_C, row_S, tok_S, counts_R, C = pad_blocks(x_TD, idx_TK, p_TK, R, El)
    split = [C] * R
    with _span("dispatch_ids"):  # the local expert ids, beside the rows: no host sync
        (lid_N,) = _a2a((lid_C,), split, split, group, None, "dispatch_ids")
    xr_ND, pr_N = _Exchange.apply((split, split, group, "dispatch"), x_CD, p_C)
    _note_rows(counts_R.sum(), counts_R, None, r, padded=R * C)
    # 2. local experts on every received row: a padding row is zeros with gate weight 0, so it adds nothing
    yr_ND = _experts(local_fwd, xr_ND, lid_N, pr_N, w1, w2)
    # 3. combine: the blocks go home; each token sums its K slots from the rows it sent
    (ys_CD,) = _Exchange.apply((split, split, group, "combine"), yr_ND)
    return torch.zeros_like(x_TD).index_add_(0, tok_S, ys_CD[row_S])


def _available():
    return None if dist.is_available() else "this torch build has no torch.distributed"


register(Backend(
    name="ep",
    forward=forward,
    description="expert parallel: all_to_all_single dispatch/combine over torch.distributed, local experts "
                "via option `local` (run with --nproc N)",
    needs_process_group=True,
    host_sync="the split sizes of the uneven all-to-all go to the host (.tolist())",
    options={"local": "grouped_mm"},
    available=_available,
))

register(Backend(
    name="ep-padded",
    forward=forward_padded,
    description="expert parallel without host sync: equal-split all_to_all_single of blocks padded to the worst "
                "case (T*min(K, E/R) rows per rank pair; dropless), local experts via option `local` "
                "(run with --nproc N)",
    needs_process_group=True,
    host_sync=None,  # its own step never waits on the host; the `local` backend's host_sync counts (core.exec_reason)
    options={"local": "grouped_mm"},
    available=_available,
))

register(Backend(
    name="ep-dedup",
    forward=forward_dedup,
    description="expert parallel, one row per (token, destination rank) on the wire (DeepEP-style dedup), "
                "local experts via option `local` (run with --nproc N)",
    needs_process_group=True,
    host_sync="the split sizes of the uneven all-to-all go to the host (.tolist())",
    options={"local": "grouped_mm"},
    available=_available,
))
