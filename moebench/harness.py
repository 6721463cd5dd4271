"""Runs one Case and returns one Record: availability -> parity vs naive -> measure. Never raises for a problem of
the case itself: every outcome (ok, skipped, mismatch, oom, failed) is a record with its reason.

The measuring is moebench.core's; this module maps what happens to a status. The single-process worker
(moebench.runner) calls run_case as it is; a torchrun rank (moebench.distributed) passes its own parity and
measure functions (the same core, on its rank of the case); a train-run case is measured by moebench.train.
"""
from __future__ import annotations

import traceback

import torch

from moebench import core, train
from moebench.registry import get
from moebench.results import make_record
from moebench.spec import Case


def run_case(case: Case, run_id: str, env: dict, *, parity_fn=None, measure_fn=None) -> dict:
    def rec(status, reason="", m=None):
        return make_record(case, status, run_id=run_id, env=env, reason=reason, metrics=m)

    try:
        backend = get(case.backend)
    except KeyError as e:
        return rec("failed", str(e))
    reason = core.skip_reason(case, backend)
    if reason:
        return rec("skipped", reason)
    device = torch.device(case.device)
    parity_fn = parity_fn or core.parity
    if measure_fn is None:
        if case.workload.level == "train-run":  # a training run on real text: loss and balance per step
            measure_fn = train.run
        else:
            measure_fn = core.measure
    m: dict = {}
    try:
        core.apply_memory_budget(case)
        m["parity"] = parity_fn(case)
        if not m["parity"]["ok"]:
            return rec("mismatch", core.mismatch_reason(m["parity"]), m)
        m |= measure_fn(case, device)
        return rec("ok", "", m)
    except torch.OutOfMemoryError as e:
        return rec("oom", core.first_line(e), m | core.memory(device))
    except core.NonFiniteLoss as e:
        return rec("failed", str(e), m | getattr(e, "metrics", {}) | {"failed_step": e.step})
    except Exception as e:  # noqa: BLE001 - one failing case never stops the suite
        if "DefaultCPUAllocator: can't allocate memory" in str(e):  # CPU out of memory: a RuntimeError
            return rec("oom", core.first_line(e), m | core.memory(device))
        return rec("failed", f"{type(e).__name__}: {core.first_line(e)}",
                   m | {"traceback": traceback.format_exc()[-4000:]})
    finally:
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a device-side assert is sticky: the record above already says why
                pass
