"""One timing process per device: a lock file per device with the holder's pid.

Two moebench processes timing one device at once slow each other down (seen: 300-1000x on a 2-core machine),
and nothing in their samples would say so. So every case is timed holding its device's lock:
  wait (default)  a second run waits until the first releases the device, and says whom it waits for;
  --no-wait       it times anyway, and every record it times while another process holds the lock is flagged
                  noisy with the holder's pid.
Lock files live in $MOEBENCH_LOCK_DIR (default: <tmp>/moebench-locks), one per device: `cpu` (the whole machine:
CPU timings share its cores) or `cuda-<id>` for each GPU a run uses (the CUDA_VISIBLE_DEVICES entries, else
their indices). flock() releases by itself when the holder dies, so a crashed run never leaves a device locked.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path


def lock_dir() -> Path:
    d = Path(os.environ.get("MOEBENCH_LOCK_DIR") or Path(tempfile.gettempdir()) / "moebench-locks")
    d.mkdir(parents=True, exist_ok=True)
    return d


def device_ids(device: str, n: int = 1) -> list[str]:
    """The lock names of the first n devices of this kind this process would use."""
    if device != "cuda":
        return ["cpu"]
    vis = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = vis[:n] if vis else [str(i) for i in range(n)]
    return [f"cuda-{i}" for i in ids]


class DeviceLock:
    """Held around each timed case. acquire() returns None, or (with wait=False, device busy) why the timing
    that follows is not trustworthy. on_wait(msg) is told once when waiting starts."""

    def __init__(self, device: str, n: int = 1, *, wait: bool = True, on_wait=None):
        self.ids, self.wait, self.on_wait = device_ids(device, n), wait, on_wait
        self._files: list = []
        self.waited_s = 0.0
        self.busy: str | None = None

    def acquire(self) -> str | None:
        busy = []
        for dev in sorted(self.ids):  # one order for every process (CUDA_VISIBLE_DEVICES 0,1 vs 1,0): no deadlock
            f = open(lock_dir() / f"{dev}.lock", "a+")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(f)
                if not self.wait:
                    f.close()
                    busy.append(f"another moebench process (pid {holder}) was timing {dev} at the same time "
                                f"(--no-wait)")
                    continue
                if self.on_wait:
                    self.on_wait(f"waiting for {dev}: moebench pid {holder} is timing it")
                t0 = time.monotonic()
                fcntl.flock(f, fcntl.LOCK_EX)
                self.waited_s += time.monotonic() - t0
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self._files.append(f)
        return "; ".join(busy) or None

    def release(self) -> None:
        for f in self._files:
            try:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)
            finally:
                f.close()
        self._files = []

    def __enter__(self):
        self.busy = self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(f) -> str:
    try:
        f.seek(0)
        return f.read().strip() or "?"
    except OSError:
        return "?"
