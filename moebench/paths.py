"""Where the shipped suites (and the traces they name) live: the top-level suites/ of a source checkout, or
the installed package moebench.suites. ROOT is the directory that holds suites/: relative trace paths are
relative to it (moebench/traces.py), so a case key does not depend on where a checkout lives."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def suites_dir() -> Path:
    """The top-level suites/ of a source checkout; in an installed copy, the package moebench.suites."""
    here = Path(__file__).resolve().parent.parent / "suites"
    if here.is_dir():
        return here
    spec = importlib.util.find_spec("moebench.suites")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return here


SUITES_DIR = suites_dir()
ROOT = SUITES_DIR.parent
