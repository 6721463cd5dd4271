"""ep-pipelined (implementations/ep_pipelined.py) on CPU with gloo, 2 processes.

1. Parity against naive (float64), output and every gradient, on one rank and two, 1, 2 and 4 chunks, two local
   backends, random routing and every slot on rank 0.
2. The overlap is real, forward AND backward: an event log of the exchanges (issued, waited) and of a probe local
   backend's forward and backward per chunk shows chunk c+1's exchange issued before chunk c's experts run and
   waited for only after them, in both directions (the backward order is autograd's, so this can fail).
3. No host sync in the step (tests/hostsync.py); a chunk count that does not divide the tokens, or is not an
   integer >= 1, is a clear error.
"""
import pytest
import torch
import torch.distributed as dist

from implementations import ep, ep_pipelined
from moebench import registry
from moebench.registry import Backend, register, unregister
from tests.hostsync import no_host_sync
from tests.procs import spawn_ranks
from tests.test_ep import _compare, _data


def _probe(log):
    """A local backend: grouped_mm, logging its forward and backward (chunk by call order)."""
    gmm = registry.get("grouped_mm").forward
    calls = []

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, i, y):
            ctx.i = i
            return y.view_as(y)

        @staticmethod
        def backward(ctx, dy):
            log.append(("experts_bwd", ctx.i))
            return None, dy

    def forward(x, idx, p, w1, w2):
        i = len(calls)
        calls.append(i)
        log.append(("experts", i))
        return Mark.apply(i, gmm(x, idx, p, w1, w2))
    return forward


def _order(rank, n):
    log, boxes = [], {}
    real_issue, real_wait = ep_pipelined._issue, ep_pipelined._wait

    def chunk(box):  # boxes of one kind are issued in chunk order
        seen = boxes.setdefault(box.kind, [])
        if box not in seen:
            seen.append(box)
        return seen.index(box)

    def issue(box, xs, kind):
        log.append(("issue " + kind, chunk(box)))
        return real_issue(box, xs, kind)

    def wait(box, works, kind):
        log.append(("wait " + kind, chunk(box)))
        return real_wait(box, works, kind)

    register(Backend("ep-probe-local", _probe(log), "test only"))
    ep_pipelined._issue, ep_pipelined._wait = issue, wait
    try:
        w1, w2, per = _data([10 * n, 10 * n], "random", seed=5)
        x = per[rank]["x"].requires_grad_()
        y = ep_pipelined.forward(x, per[rank]["idx"], per[rank]["p"], w1.requires_grad_(), w2.requires_grad_(),
                                 local="ep-probe-local", chunks=n)
        y.backward(per[rank]["dy"])
    finally:
        ep_pipelined._issue, ep_pipelined._wait = real_issue, real_wait
        unregister("ep-probe-local")
        ep._local_backend.cache_clear()
    at = {e: i for i, e in enumerate(log)}
    for c in range(n - 1):
        # forward: chunk c+1's dispatch is on the wire while chunk c's experts run
        assert at[("issue dispatch", c + 1)] < at[("experts", c)] < at[("wait dispatch", c + 1)], log
        # backward: chunk c+1's gradient goes back (dispatch_bwd) while chunk c's expert backward runs
        assert at[("issue dispatch_bwd", c + 1)] < at[("experts_bwd", c)] < at[("wait dispatch_bwd", c + 1)], log
    for c in range(1, n):  # combine(c-1) is on the wire while chunk c computes, forward and backward
        assert at[("issue combine", c - 1)] < at[("experts", c)] < at[("wait combine", c - 1)], log
        assert at[("issue combine_bwd", c)] < at[("experts_bwd", c - 1)], log


def _worker(rank, R):
    one = dist.new_group([0])
    for chunks, local in ((1, "grouped_mm"), (2, "shuffle"), (4, "grouped_mm")):
        _compare(rank, R, "ep-pipelined", local, Ts=[24, 24], routing="random", chunks=chunks)
        if rank == 0:
            with ep.use_group(one):
                _compare(0, 1, "ep-pipelined", "grouped_mm", Ts=[20], routing="random", chunks=chunks)
    _compare(rank, R, "ep-pipelined", "grouped_mm", Ts=[16, 16], routing="rank0-only", chunks=2)
    _order(rank, 3)
    w1, w2, per = _data([24, 24], "random")
    with pytest.raises(ValueError, match=r"option chunks \(5\) must divide the tokens per rank \(24\)"):
        ep_pipelined.forward(per[rank]["x"], per[rank]["idx"], per[rank]["p"], w1, w2, chunks=5)
    x = per[rank]["x"].requires_grad_()
    ep_pipelined.forward(x, per[rank]["idx"], per[rank]["p"], w1, w2, chunks=3).sum().backward()  # T checked
    with ep.recording(torch.device("cpu")) as rec, no_host_sync():
        rec.step = 0
        ep_pipelined.forward(x, per[rank]["idx"], per[rank]["p"], w1, w2, chunks=3).sum().backward()
    kinds = {k for _, k, _ in rec.read()}
    assert {"dispatch_wait", "combine_wait", "dispatch_bwd_wait", "combine_bwd_wait"} <= kinds  # exposed time
    assert {k for _, k, _ in rec.bytes} >= {"dispatch", "combine", "dispatch_bwd", "combine_bwd"}
    assert rec.rows[0][4] == 24 * 2 * 2  # padded rows received: R x T x min(K, E/R)


@pytest.mark.timeout(120)
def test_ep_pipelined_matches_naive_and_overlaps(tmp_path):
    spawn_ranks(_worker, tmp_path)


def test_chunks_option_is_validated():
    v = registry.get("ep-pipelined").validate
    assert v({"chunks": 4}) is None and v({}) is None
    for bad in (0, -1, 1.5, True, "2"):
        assert "chunks must be an integer >= 1" in v({"chunks": bad})
    assert registry.get("ep-pipelined").sync_reason("cuda", "bfloat16") is None
