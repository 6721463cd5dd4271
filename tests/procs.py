"""Process helpers shared by the fault tests (tests/test_faults.py, tests/test_ep.py): has a process exited, wait
for a condition, which live processes carry a string in their command line."""
from __future__ import annotations

import time
from pathlib import Path


def gone(pid: int, within_s: float = 5.0) -> bool:
    """True once pid has exited (a zombie waiting for its reaper has exited too)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}")
        time.sleep(0.1)


def alive_with(text: str) -> list[int]:
    """Pids whose command line contains text (an exited process's is empty, so zombies are not listed)."""
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmd.read_bytes().decode(errors="replace"):
                pids.append(int(cmd.parent.name))
        except OSError:
            pass
    return pids
