"""Test-only backends that misbehave on purpose (fault injection for tests/test_faults.py).

They register on import. Worker processes are spawned and import only the registry, so the tests set
MOEBENCH_EXTRA_BACKENDS=tests.faultbackends (see moebench/registry.py) and put the repo root on the path.
Each computes naive's function until its fault fires, so the fault is the only thing wrong with it.

  fault-kill   SIGKILLs its own worker process
  fault-hang   starts a grandchild (`sleep`), writes "<worker pid> <grandchild pid>" to `pidfile`, then sleeps
               forever. When `pidfile` already exists it behaves (hangs once, so a --resume can finish)
  fault-oom    raises torch.OutOfMemoryError
  fault-cpu-oom  asks the CPU allocator for 2**60 bytes (a RuntimeError from torch, not an OutOfMemoryError)
  fault-wrong  returns naive * (1 + 1e-3): slightly wrong, far past the fp32 parity tolerance (1e-5)
  fault-raise  raises ValueError(RAISE_MESSAGE), a message with rich-markup-like brackets in it
  fault-nan    returns NaN from its `nan_from_call`-th call on (call 0 is the parity check; a model-level step
               calls it once per MoE layer). Calls are counted per process and per nan_from_call value
  sleeper      grouped_mm's result (naive's function) in a step of a set length: from its forward's start, it
               sleeps until $MOEBENCH_TEST_SLEEP_MS ms (default 20) have passed, at the end of its backward (of its
               forward when no backward follows), so the compute beside the sleep does not add to the step. A step
               time a test sets from outside the case: two runs of the SAME case key can differ by a planted
               amount. (A plain sleep before the compute was not enough: in CI one whole ~2 s run had its compute
               slowed enough to put it 7% off its twin, with a tight interval: stop 23.) It sets its worker to one
               torch thread (an OpenMP pool woken after each sleep adds jitter)
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from implementations.naive import forward as naive_forward
from moebench.registry import _REGISTRY, Backend, register, unregister

_calls: dict[int, int] = {}  # nan_from_call -> calls so far in this process


def kill_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached
    raise AssertionError("still alive after SIGKILL")


def hang_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, pidfile=""):
    if pidfile and os.path.exists(pidfile):
        return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
    child = subprocess.Popen(["sleep", "600"])  # same process group: the runner must kill it too
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
        os.replace(pidfile + ".tmp", pidfile)
    while True:
        time.sleep(3600)


def oom_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected by tests)")


RAISE_MESSAGE = "bad value [nan] in [/tmp/x] [/]"


def raise_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    raise ValueError(RAISE_MESSAGE)


def cpu_oom_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    return torch.empty(2**60, dtype=torch.uint8)


def wrong_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    return naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD) * (1 + 1e-3)


def nan_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, nan_from_call=1):
    n = _calls.get(nan_from_call, 0)
    _calls[nan_from_call] = n + 1
    y_TD = naive_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
    return y_TD * float("nan") if n >= nan_from_call else y_TD


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.perf_counter()))


class _EndsAt(torch.autograd.Function):
    """Identity on the block's first input; its backward runs after the rest of the expert block's backward and
    sleeps until the step's deadline, so the sleep ends the step's compute instead of adding to it."""

    @staticmethod
    def forward(ctx, t, deadline: float):
        ctx.deadline = deadline
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        _sleep_until(ctx.deadline)
        return g, None


def sleep_forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD):
    if torch.get_num_threads() != 1:  # one thread: no OpenMP pool to wake after each sleep (its wake-up time varies)
        torch.set_num_threads(1)
    deadline = time.perf_counter() + float(os.environ.get("MOEBENCH_TEST_SLEEP_MS", "20")) / 1e3
    # grouped_mm's few ops, not naive's per-expert loop: the compute beside the sleep stays small
    from implementations.grouped_mm import forward
    first = next((t for t in (x_TD, w1_EDF2) if t.requires_grad), None) if torch.is_grad_enabled() else None
    if first is None:  # no backward follows: the forward ends at the deadline
        y_TD = forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD)
        _sleep_until(deadline)
        return y_TD
    if first is x_TD:
        return forward(_EndsAt.apply(x_TD, deadline), idx_TK, p_TK, w1_EDF2, w2_EFD)
    return forward(x_TD, idx_TK, p_TK, _EndsAt.apply(w1_EDF2, deadline), w2_EFD)


BACKENDS = [
    Backend("fault-kill", kill_forward, "test only: SIGKILLs its worker"),
    Backend("fault-hang", hang_forward, "test only: starts a grandchild and hangs", options={"pidfile": ""}),
    Backend("fault-oom", oom_forward, "test only: raises torch.OutOfMemoryError"),
    Backend("fault-cpu-oom", cpu_oom_forward, "test only: allocates 2**60 bytes on the CPU", devices=("cpu",)),
    Backend("fault-raise", raise_forward, "test only: raises ValueError"),
    Backend("fault-wrong", wrong_forward, "test only: naive * (1 + 1e-3)"),
    Backend("sleeper", sleep_forward, "test only: naive in a step of $MOEBENCH_TEST_SLEEP_MS ms"),
    Backend("fault-nan", nan_forward, "test only: NaN output from the n-th call", options={"nan_from_call": 1}),
]
NAMES = [b.name for b in BACKENDS]


def register_all() -> None:
    for b in BACKENDS:
        if b.name not in _REGISTRY:
            register(b)


def unregister_all() -> None:
    """Keep the test process's registry clean for other test files (which may loop over all backends)."""
    for name in NAMES:
        unregister(name)


register_all()
