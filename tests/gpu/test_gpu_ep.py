"""GPU tier: expert parallelism over NCCL on two GPUs, end to end through `moebench run --nproc 2 --device cuda`
(torchrun, one process per GPU): `ep` and `ep-dedup` on 1 and 2 ranks, fp32 and bf16, every record ok with its
parity (each rank's output and gradients against naive on the global batch) under the tolerance; `ep-padded` (local
grouped_mm and triton) captured as CUDA graphs with its NCCL all-to-alls, and free of host syncs under
torch.cuda.set_sync_debug_mode("error").

NVLink multicast stays off in everything launched (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): on the lent machines it can take the host's GPUs out of service.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.procs import spawn_ranks

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _run_on_two_gpus(tmp_path, suite_text: str) -> list[dict]:
    """`moebench run --nproc 2 --device cuda` on the suite (skips on a machine with fewer than 2 GPUs): its records."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()} (kind nvidia-h200-x2)")
    suite, out = tmp_path / "ep-gpu.toml", tmp_path / "ep.jsonl"
    suite.write_text(suite_text)
    env = dict(os.environ, **NO_MULTICAST, MOEBENCH_TRITON_TUNE="0",  # parity and plumbing here, not tuned speed
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "moebench", "run", "--suite", str(suite), "--nproc", "2",
                           "--device", "cuda", "--out", str(out), "--no-report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


SUITE = """
description = "GPU tier: expert parallel over NCCL, 1 and 2 ranks (tests/gpu/test_gpu_ep.py)"
timeout_s = 300

[[matrix]]
models = [{ preset = "olmoe-layer", d_model = 512, d_expert = 256, n_experts = 16, top_k = 4, name = "ep-gpu-tier" }]
backends = [{ name = "ep", local = "grouped_mm" }, { name = "ep-dedup", local = "grouped_mm" }]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 1024
dtype = ["float32", "bfloat16"]
routing = "uniform"
ranks = [1, 2]
warmup = 2
repeats = 5
"""


@pytest.mark.timeout(600)
def test_ep_over_nccl_on_two_gpus(tmp_path):
    recs = _run_on_two_gpus(tmp_path, SUITE)
    assert len(recs) == 8, [r["label"] for r in recs]  # 2 backends x 2 dtypes x 1, 2 ranks
    for r in recs:
        assert r["status"] == "ok", (r["label"], r["reason"])
        m, w = r["metrics"], r["case"]["workload"]
        R = w.get("ranks") or 1
        tol = 1e-5 if w["dtype"] == "float32" else 2e-2
        assert m["parity"]["ok"] and m["parity"]["ranks"] == R and max(m["parity"]["errors"].values()) <= tol, m
        assert m["ep"]["ranks"] == R and len(m["ep"]["per_rank"]) == R
        if R == 2:
            assert all(p["rows_received"] > 0 for p in m["ep"]["per_rank"]), m["ep"]["per_rank"]
            assert 0 < m["ep"]["a2a_share"] < 1 and m["scaling"]["weak"]["efficiency"] > 0, m["scaling"]
    assert recs[0]["env"]["gpu_count"] >= 2, recs[0]["env"]


PADDED_SUITE = """
description = "GPU tier: ep-padded and ep-pipelined over NCCL, eager and CUDA graphs (tests/gpu/test_gpu_ep.py)"
timeout_s = 300

[[matrix]]
models = [{ preset = "olmoe-layer", d_model = 512, d_expert = 256, n_experts = 16, top_k = 4, name = "ep-gpu-tier" }]
backends = [{ name = "ep-padded", local = "grouped_mm" }, { name = "ep-padded", local = "triton" },
            { name = "ep", local = "triton" }, { name = "ep-pipelined", local = "grouped_mm", chunks = 2 }]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 1024
dtype = "bfloat16"
routing = "uniform"
ranks = [1, 2]
exec = ["eager", "graphs"]
warmup = 2
repeats = 5

[[matrix]]
models = [{ preset = "olmoe-layer", d_model = 512, d_expert = 256, n_experts = 16, top_k = 4, name = "ep-gpu-tier" }]
backends = ["grouped_mm", "triton"]
[[matrix.workloads]]
level = "layer"
mode = "train"
batch = 1
seq = 1024
dtype = "bfloat16"
routing = "uniform"
exec = ["eager", "graphs"]
warmup = 2
repeats = 5
"""


@pytest.mark.timeout(600)
def test_ep_padded_under_cuda_graphs_on_two_gpus(tmp_path):
    """ep-padded's step is captured as one CUDA graph (NCCL all-to-alls inside) and replayed, on 1 and 2 ranks,
    with local grouped_mm and triton, and so is ep-pipelined's (async all-to-alls); ep (host sync) is skipped under
    graphs with its reason; every ok record passes parity, 2-rank eager records carry exchange bytes, GB/s and
    padding, and every 2-rank record its speed-up over the best one-GPU record."""
    recs = _run_on_two_gpus(tmp_path, PADDED_SUITE)
    assert len(recs) == 20, [r["label"] for r in recs]  # 4 EP x 2 ranks x 2 execs + 2 one-GPU x 2 execs
    for r in recs:
        c, m, w = r["case"], r["metrics"], r["case"]["workload"]
        R = w.get("ranks") or 1
        if c["backend"] == "ep" and w["exec"] == "graphs":
            assert r["status"] == "skipped" and "syncs with the host" in r["reason"], r["reason"]
            continue
        assert r["status"] == "ok", (r["label"], r["reason"])
        assert m["parity"]["ok"] and max(m["parity"]["errors"].values()) <= 2e-2, m["parity"]
        if w["exec"] == "graphs":
            assert m["exec"]["mode"] == "graphs" and m["exec"]["capture_s"] > 0, m["exec"]
        if c["backend"] in ("ep-padded", "ep-pipelined") and R == 2:
            ep = m["ep"]
            if w["exec"] == "eager":
                assert ep["bytes_by_kind"]["dispatch"] > 0, ep
                if c["backend"] == "ep-padded":
                    assert ep["gbps_by_kind"]["dispatch"] > 0, ep
                else:  # the waits only: exposed time, below the whole exchanges
                    assert "dispatch_wait" in ep["a2a_ms_by_kind"], ep
                assert 0.3 < ep["padding_frac"] < 0.7, ep  # uniform routing, E/R >= K: about 1 - 1/R
                assert 0 < ep["a2a_share"] < 1
            else:  # a replayed graph counts nothing: None, not 0
                assert ep["a2a_share"] is None and ep["padding_frac"] is None and ep["bytes_by_kind"] == {}, ep
        if R == 2:
            assert m["scaling"]["vs_best_one_gpu"]["speedup"] > 0, (r["label"], m["scaling"])


def _no_sync_worker(rank, R):
    from implementations import ep
    from moebench import registry
    T, D, F, E, K = 512, 256, 128, 16, 4
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
    p = torch.rand(T, K, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w1 = (torch.randn(E, D, 2 * F, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(E, F, D, device="cuda", generator=g) / F ** 0.5).to(torch.bfloat16).requires_grad_()
    fwd = registry.get("ep-padded").forward
    fwd(x, idx, p, w1, w2).sum().backward()  # the first call checks the token counts (one all_gather)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            fwd(x, idx, p, w1, w2).sum().backward()
        with ep.recording(torch.device("cuda")):  # the exchange timings (CUDA events) add no sync either
            fwd(x, idx, p, w1, w2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:  # the check can fail: ep's split sizes go to the host
        torch.cuda.set_sync_debug_mode("error")
        registry.get("ep").forward(x, idx, p, w1, w2)
        raise AssertionError("ep ran under sync debug mode 'error' without a sync")
    except RuntimeError as e:
        assert "synchroniz" in str(e), e
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.timeout(300)
def test_ep_padded_never_syncs_on_two_gpus(tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode('error') around ep-padded's forward and backward over NCCL (local
    grouped_mm, bf16): no operation waits on the device; the same mode catches ep's .tolist()."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()} (kind nvidia-h200-x2)")
    for k, v in NO_MULTICAST.items():
        monkeypatch.setenv(k, v)  # the spawned ranks inherit them
    spawn_ranks(_no_sync_worker, tmp_path, backend="nccl")
