"""ep-padded (implementations/ep.py): expert parallel with no host sync in the step, on CPU with gloo.

1. Parity against naive on the unsharded layer (float64 reference), output and every gradient, on one rank and on
   two, for each local backend, with random routing and with every slot on rank 0 (rank 1 receives only padding).
2. No host sync: a step (forward and backward, exchange timings on) runs under tests/hostsync.no_host_sync(), which
   first has to catch `ep`'s .tolist() (so the check can fail). The one all_gather that checks every rank has the
   same token count runs once per count, before; different counts are a clear error on every rank.
3. The padding is what the docstring says: every rank receives R * T * min(K, E/R) rows, of which the routed slots
   are real.
"""
import importlib.util

import pytest
import torch
import torch.distributed as dist

from implementations import ep
from moebench import registry
from tests.hostsync import HostSync, no_host_sync
from tests.procs import spawn_ranks
from tests.test_ep import _compare, _data

K, E = 2, 4


def _step(backend, rank, Ts, local="grouped_mm"):
    w1, w2, per = _data(Ts, "random", seed=11)
    x, p = per[rank]["x"].clone().requires_grad_(), per[rank]["p"].clone().requires_grad_()
    w1, w2 = w1.requires_grad_(), w2.requires_grad_()
    y = registry.get(backend).forward(x, per[rank]["idx"], p, w1, w2, local=local)
    y.backward(per[rank]["dy"])
    return y


def _worker(rank, R):
    one = dist.new_group([0])
    for local in ("grouped_mm", "shuffle", "naive"):
        _compare(rank, R, "ep-padded", local, Ts=[24, 24], routing="random")
        if rank == 0:
            with ep.use_group(one):
                _compare(0, 1, "ep-padded", local, Ts=[29], routing="random")
    _compare(rank, R, "ep-padded", "grouped_mm", Ts=[16, 16], routing="rank0-only")

    with pytest.raises(ValueError, match=r"ep-padded: every rank needs the same number of tokens.*\[37, 5\]"):
        _step("ep-padded", rank, [37, 5])

    _step("ep-padded", rank, [20, 20])  # the first call with T=20 checks the token counts (one all_gather)
    with ep.recording(torch.device("cpu")) as rec:
        rec.step = 0
        with pytest.raises(HostSync, match="tolist"), no_host_sync():
            _step("ep", rank, [20, 20])
        dist.barrier()  # ep's rank stopped before its exchange on both ranks alike: realign
        rec.bytes.clear()
        rec.rows.clear()
        with no_host_sync():
            y = _step("ep-padded", rank, [20, 20])
        assert torch.isfinite(y).all()
        rec.read()
        _, N, _, _, padded = rec.rows[0]
        T, El = 20, E // R
        assert padded == R * T * min(K, El) and 0 < N < padded
        kinds = {k for _, k, _ in rec.bytes}
        assert {"dispatch", "combine", "dispatch_bwd", "combine_bwd", "dispatch_ids"} <= kinds
        row_bytes = 16 * 4  # D=16 float32; p rides in the same exchange (4 bytes a row)
        got = sum(b for _, k, b in rec.bytes if k == "dispatch")
        assert got == (R - 1) * T * min(K, El) * (row_bytes + 4)  # the wire carries the padding too
    with ep.recording(torch.device("cpu")) as rec:  # ep's dispatch bytes: the real remote rows only
        rec.step = 0
        _step("ep", rank, [20, 20])
        rec.read()
        sent_remote = rec.rows[0][2]
        assert sum(b for _, k, b in rec.bytes if k == "dispatch") == sent_remote * (row_bytes + 4)


@pytest.mark.timeout(120)
def test_ep_padded_matches_naive_without_host_sync(tmp_path):
    spawn_ranks(_worker, tmp_path)


def test_ep_padded_is_registered_graphable():
    b = registry.get("ep-padded")
    assert b.needs_process_group and b.dropless and b.sync_reason("cuda", "bfloat16") is None
    assert registry.get("ep").sync_reason("cuda", "bfloat16")  # the contrast: ep's splits go to the host


def _triton_worker(rank, R):
    assert registry.get("triton").why_not("cpu", "float32") is None  # under TRITON_INTERPRET=1
    one = dist.new_group([0])
    for backend in ("ep", "ep-dedup", "ep-padded"):
        _compare(rank, R, backend, "triton", Ts=[24, 24], routing="random")
        if rank == 0:
            with ep.use_group(one):
                _compare(0, 1, backend, "triton", Ts=[20], routing="random")


@pytest.mark.timeout(120)
def test_ep_local_triton_matches_naive(tmp_path, monkeypatch):
    """`local = "triton"`: our Triton kernels (run by Triton's interpreter on CPU) as every EP variant's local
    experts, on one rank and two, output and every gradient against naive in float64."""
    if importlib.util.find_spec("triton") is None:  # not imported here: this process stays interpreter-free
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks inherit it
    spawn_ranks(_triton_worker, tmp_path)
