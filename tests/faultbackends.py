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
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from implementations.naive import forward as naive_forward
from moebench.registry import _REGISTRY, Backend, register

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


BACKENDS = [
    Backend("fault-kill", kill_forward, "test only: SIGKILLs its worker"),
    Backend("fault-hang", hang_forward, "test only: starts a grandchild and hangs", options={"pidfile": ""}),
    Backend("fault-oom", oom_forward, "test only: raises torch.OutOfMemoryError"),
    Backend("fault-cpu-oom", cpu_oom_forward, "test only: allocates 2**60 bytes on the CPU", devices=("cpu",)),
    Backend("fault-raise", raise_forward, "test only: raises ValueError"),
    Backend("fault-wrong", wrong_forward, "test only: naive * (1 + 1e-3)"),
    Backend("fault-nan", nan_forward, "test only: NaN output from the n-th call", options={"nan_from_call": 1}),
]
NAMES = [b.name for b in BACKENDS]


def register_all() -> None:
    for b in BACKENDS:
        register(b)


def unregister_all() -> None:
    """Keep the test process's registry clean for other test files (which may loop over all backends)."""
    for name in NAMES:
        _REGISTRY.pop(name, None)


register_all()
