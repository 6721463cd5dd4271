"""Shared test fixtures. Kept small: every test file runs with it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests.faultbackends` importable here and in spawned workers (they copy sys.path)
    sys.path.insert(0, str(ROOT))

EXTRA = "tests.faultbackends"


@pytest.fixture(scope="module")
def fault_backends():
    """The fault-injection backends (tests/faultbackends.py), registered in this process and, through
    MOEBENCH_EXTRA_BACKENDS, in the worker processes it spawns; removed again afterwards."""
    from tests import faultbackends

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEBENCH_EXTRA_BACKENDS", EXTRA)
        faultbackends.register_all()
        try:
            yield faultbackends
        finally:
            faultbackends.unregister_all()


@pytest.fixture
def cli_env() -> dict:
    """Environment for a `python -m moebench` subprocess that can use the fault-injection backends."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, MOEBENCH_EXTRA_BACKENDS=EXTRA, COLUMNS="200")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (the GPU tier, tests/gpu/) are skipped, with the reason, where there is no CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False (GPU tier: scripts/gpu_tests.sh)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Where moebench's Triton kernels run in a test: "cuda", compiled for the GPU (TRITON_INTERPRET unset), when
    CUDA is there; else "cpu" under Triton's interpreter (TRITON_INTERPRET=1). Restored after the test."""
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
