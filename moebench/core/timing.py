"""Warm-up and timed steps: CUDA events around each step (perf_counter on CPU), in blocks, until the median is
pinned down or the case's time budget is spent.

Precision-driven repeats (the way pytest-benchmark calibrates and asv repeats): after the warm-up, a case runs
timed blocks of `block_steps` steps each. After every block, the 95% interval of the median step time is taken
over the block medians (metrics.median_ci: a distribution-free order-statistic interval, so it carries the case's
block-to-block variation, not only step-to-step jitter). Timing stops when that interval's half-width is within
`precision` of the median (and at least `min_steps` steps and MIN_BLOCKS blocks ran), or when `max_time_s` is
spent (then precision is not reached, and the record says so), or after MAX_STEPS steps.
Block size: about BLOCK_S of steps (from the warm-up's step time), so blocks see the machine at different moments,
and small enough that MIN_BLOCKS blocks fit the budget.
"""
from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moebench import metrics

WARMUP_MIN_S = {"cuda": 1.0, "cpu": 0.25}  # warm-up lasts at least this long (clocks, allocator, caches settle)...
WARMUP_MAX_STEPS = 2000  # ... or this many steps
BLOCK_S = 0.05        # target length of one timed block
MIN_BLOCKS = 6        # the fewest blocks that give a 95% interval of their median (min and max: 96.9%)
MAX_BLOCK_STEPS = 1000
MAX_STEPS = 20000
KEEP_OUTS = 200       # outputs kept (after()) for the balance metrics: those of the first KEEP_OUTS timed steps

Agree = Callable[[bool, str], bool]  # (flag, "any" | "all") -> the flag combined over every rank of a case


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self):
        self.spans.append([self._now(), None])

    def stop(self):
        self.spans[-1][1] = self._now()

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.spans]
        return [(b - a) * 1e3 for a, b in self.spans]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm_up(step, n: int, device: torch.device, agree: Agree | None = None, check=None) -> tuple[int, float]:
    """At least max(n, 1) steps, and at least WARMUP_MIN_S seconds of them. Returns (steps run, the step time
    estimate in s: median wall time of the last few, each synchronised). With `agree`, every rank runs as many;
    check(i, out), if given, sees each warm-up step's output (e.g. raises on a non-finite loss)."""
    t0, i, wall = time.perf_counter(), 0, []
    min_s = WARMUP_MIN_S.get(device.type, 0.5)
    while True:
        more = i < max(n, 1) or (time.perf_counter() - t0 < min_s and i < WARMUP_MAX_STEPS)
        if agree is not None:
            more = agree(more, "any")
        if not more:
            break
        if step.before is not None:
            step.before(i)
        ts = time.perf_counter()
        out = step.run(i)
        _sync(device)
        wall.append(time.perf_counter() - ts)
        if check is not None:
            check(i, out)
        i += 1
    settled = wall[1:] or wall  # the first step carries first-call costs (allocation, autotuning, compiling)
    return i, float(np.median(settled[-5:]))


@contextmanager
def collector_off():
    """One collection first, then none while timing: a collector pass (tens to hundreds of ms with torch loaded)
    must land neither inside a timed step nor between blocks, where it would spend the case's time budget."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed_block(step, first: int, n: int, device: torch.device, flush=None, before=None):
    """One block: n calls of step.run(i), each between two CUDA events (perf_counter on CPU); call it with the
    collector off (collector_off). Outside the events: step.before(i) (graphs: the input copy), then the L2 flush,
    then before(k) (k counts the timed steps of the case), and after the stop event step.after(out).
    Returns (step_ms, outputs)."""
    timer, outs = Timer(device), []
    for j in range(n):
        i = first + j
        if step.before is not None:
            step.before(i)
        if flush is not None:
            flush.fill_(float(i))  # after the input copy: no step starts with a warm L2
        if before is not None:
            before(j)
        timer.start()
        out = step.run(i)
        timer.stop()
        outs.append(step.after(out))
    return timer.ms(), outs


@dataclass
class Timing:
    step_ms: list[float]
    block_steps: int
    precision: dict
    outs: list = field(default_factory=list)      # after() of the first KEEP_OUTS timed steps
    losses: list = field(default_factory=list)    # the loss of every timed step (model/train), as returned


def block_size(est_s: float, min_steps: int, max_time_s: float) -> int:
    est_s = max(est_s, 1e-6)
    b = min(math.ceil(BLOCK_S / est_s), math.ceil(max_time_s / (MIN_BLOCKS * est_s)), MAX_BLOCK_STEPS)
    return max(1, b, math.ceil(min_steps / MIN_BLOCKS))


def time_precise(step, device: torch.device, *, first: int, est_s: float, min_steps: int, precision: float,
                 max_time_s: float, flush=None, before=None, agree: Agree | None = None) -> Timing:
    """Timed blocks until the median is within `precision` (95%), or max_time_s is spent (see the module doc)."""
    b = block_size(est_s, min_steps, max_time_s)
    with collector_off():
        return _blocks(step, device, first, b, min_steps, precision, max_time_s, flush, before, agree)


def _blocks(step, device, first, b, min_steps, precision, max_time_s, flush, before, agree) -> Timing:
    step_ms: list[float] = []
    outs, losses = [], []
    t0 = time.perf_counter()
    while True:
        k0 = len(step_ms)
        ms, o = timed_block(step, first + k0, b, device, flush,
                            (lambda j, k0=k0: before(k0 + j)) if before is not None else None)
        step_ms += ms
        losses += [step.losses_of(x) for x in o]
        outs += o[:max(0, KEEP_OUTS - len(outs))]
        p = summarize(step_ms, b, precision, max_time_s, time.perf_counter() - t0)
        enough = p["n_blocks"] >= MIN_BLOCKS and len(step_ms) >= min_steps
        done = (enough and (p["reached"] or p["time_s"] >= max_time_s)) or len(step_ms) >= MAX_STEPS
        if agree is not None:
            done = agree(done, "all")
        if done:
            return Timing(step_ms, b, p, outs, losses)


def summarize(step_ms, block_steps: int, precision: float, max_time_s: float, time_s: float) -> dict:
    """The precision block of a record: the 95% interval of the median from the block medians, and whether it is
    within `precision` (relative half-width)."""
    blocks = [float(np.median(step_ms[i:i + block_steps])) for i in range(0, len(step_ms), block_steps)]
    ci = metrics.median_ci(blocks)
    med = float(np.median(blocks))
    half = (ci[1] - ci[0]) / 2 / med if ci is not None and med > 0 else math.inf
    return {"target": precision, "reached": bool(ci is not None and half <= precision and len(blocks) >= MIN_BLOCKS),
            "ci95_ms": ci, "halfwidth": half, "n_steps": len(step_ms), "n_blocks": len(blocks),
            "block_steps": block_steps, "block_p50_ms": blocks, "time_s": time_s, "max_time_s": max_time_s}
