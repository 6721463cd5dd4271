"""Execution modes on a GPU: a graphed step computes what the eager step computes, and keeps everything it reads
alive (a collection between replays once freed the routing table under the graph: an index assert in the
replay, seen on the H200 while building the `graphs` mode)."""
from __future__ import annotations

import gc

import pytest
import torch

from moebench import core
from moebench.spec import Case, Workload, preset

pytestmark = pytest.mark.gpu


def _case(backend: str, exec_: str, level: str = "layer") -> Case:
    wl = (dict(level="layer", mode="train", batch=1, seq=2048, routing="uniform") if level == "layer"
          else dict(level="model", mode="train", batch=2, seq=256, routing="learned"))
    return Case(model=preset("olmoe-layer" if level == "layer" else "moeforge-small"), backend=backend,
                device="cuda", workload=Workload(dtype="bfloat16", exec=exec_, **wl), max_time_s=0.5)


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_a_graphed_layer_step_survives_collections_and_matches_eager(backend):
    dev = torch.device("cuda")
    eager = core.build_step(_case(backend, "eager"), dev)
    graphed = core.build_step(_case(backend, "graphs"), dev)
    want = [eager.after(eager.run(i)).clone() for i in range(3)]
    for i in range(3):
        gc.collect()
        junk = [torch.randint(0, 2**30, (1 << 20,), device=dev) for _ in range(8)]  # reuse any freed block
        graphed.before(i)
        got = graphed.after(graphed.run(i))
        torch.cuda.synchronize()
        del junk
        assert torch.equal(got, want[i])  # the same routing counts, replay after replay


def test_a_graphed_training_step_matches_eager_loss_for_loss():
    """Same weights, same batches: the graphed whole step (forward, backward, clip, AdamW) gives the eager losses.
    Before its capture the graph ran CAPTURE_WARMUP real steps on batch 0 (the capture itself runs nothing), so the
    eager reference takes those steps too before the four compared."""
    from moebench.core.steps import CAPTURE_WARMUP

    dev = torch.device("cuda")
    eager = core.build_step(_case("grouped_mm", "eager", level="model"), dev)
    for _ in range(CAPTURE_WARMUP):
        eager.run(0)  # batch 0, as the capture's warm-up
    want = [eager.losses_of(eager.after(eager.run(i))) for i in range(4)]
    graphed = core.build_step(_case("grouped_mm", "graphs", level="model"), dev)
    got = []
    for i in range(4):
        graphed.before(i)
        got.append(graphed.losses_of(graphed.after(graphed.run(i))))
    assert got == pytest.approx(want, rel=2e-2), (got, want)  # bf16; index_add_ order may differ
    assert len(set(got)) > 1  # the weights moved: the optimizer step is in the graph


def test_compile_graphs_training_step_matches_eager_and_keeps_its_outputs():
    """compile-graphs (torch.compile reduce-overhead): the first call compiles and takes a real step on batch 0, so
    the eager reference takes that step too; then four steps compare loss for loss (Inductor's fused kernels round
    differently in bf16), with no graph break, and every step's copied output stays readable after later replays."""
    dev = torch.device("cuda")
    eager = core.build_step(_case("grouped_mm", "eager", level="model"), dev)
    eager.run(0)
    want = [eager.losses_of(eager.after(eager.run(i))) for i in range(4)]
    graphed = core.build_step(_case("grouped_mm", "compile-graphs", level="model"), dev)
    outs = [graphed.after(graphed.run(i)) for i in range(4)]
    torch.cuda.synchronize()
    got = [graphed.losses_of(o) for o in outs]  # read after all four replays: copies, not the trees' buffers
    assert got == pytest.approx(want, rel=2e-2), (got, want)
    assert len(set(got)) > 1 and graphed.exec_info["graph_breaks"] == 0
