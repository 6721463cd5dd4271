"""Backend registry: name -> Backend, with availability and a one-line reason when not available.

A backend computes y_TD = forward(x_TD, idx_TK, p_TK, w1_EDF2, w2_EFD, **options), autograd-capable.
It owns no parameters and never times itself. The weights always have those shapes; `weight_layout` picks how the
MoE layer stores them in memory (WEIGHT_LAYOUTS), so a kernel that wants nn.Linear-style (out, in) weights gets them
without a per-step transpose copy that a user storing weights its way would never pay. Built-in backends live in implementations/; third-party
packages add theirs through the `moebench.backends` entry-point group (the entry point names a module
that calls `register(...)` on import, or a Backend object). MOEBENCH_EXTRA_BACKENDS names more such modules
(comma-separated); the test suite's fault-injection backends reach worker processes that way.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

from moebench.gemm_dtypes import GEMM_DTYPES

BUILTIN_MODULES = (
    "implementations.naive",
    "implementations.shuffle",
    "implementations.grouped_mm",
    "implementations.capacity",
    "implementations.triton",
    "implementations.ep",
    "implementations.ep_pipelined",
    "implementations.peers",
)

# layout -> memory order of (w1_EDF2, w2_EFD); the shapes stay canonical either way (moebench.model.expert_weights)
WEIGHT_LAYOUTS = {
    "canonical": "w1 (E, D, 2F) and w2 (E, F, D), contiguous",
    "linear": "stored as nn.Linear weights (out, in): w1 memory (E, 2F, D) [gate rows; up rows], w2 memory (E, D, F); "
              "the tensors passed are their (E, D, 2F) / (E, F, D) transposed views",
}

_REGISTRY: dict[str, "Backend"] = {}
_LOAD_ERRORS: dict[str, str] = {}
_loaded = False


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    description: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    dropless: bool = True            # False: may drop tokens (capacity); parity vs naive is then skipped
    needs_process_group: bool = False
    options: dict = field(default_factory=dict)   # option name -> default value (recorded in the case)
    available: Callable[[], str | None] = _always  # None, or why it cannot run here
    supports: Callable[..., str | None] | None = None  # (device, dtype, shape dict) -> None | reason
    # capacity backends: (T, K, E, **options) -> C, the slots each expert keeps (first come, first served,
    # moebench.routing.capacity_keep). Parity then checks the backend against naive on the kept slots, and
    # the record carries the dropped fraction.
    capacity: Callable[..., int] | None = None
    weight_layout: str = "canonical"   # a key of WEIGHT_LAYOUTS: how the MoE layer stores w1/w2 for this backend
    # True: the MoE layer folds its shared experts into this backend's expert block as always-on experts
    # (MoMoE's way: experts E..E+n_shared-1, every token, weight 1) instead of running them as a dense MLP
    folds_shared: bool = False
    # Why one step of this backend waits on the host (a .tolist(), a data-dependent shape), or None when it never
    # does: a str, or (device, dtype) -> str | None. A backend that syncs cannot be captured in a CUDA graph:
    # its `exec = "graphs"` cases end `skipped` with this reason. Unverified peers say so here.
    host_sync: str | Callable[[str, str], str | None] | None = None
    # (device, dtype) -> the code path this backend takes there, recorded with every measurement (e.g. a library
    # kernel that falls back to a slower loop on some GPUs or dtypes); None: one path everywhere
    path: Callable[[str, str], str] | None = None
    # options -> None, or why these option values are invalid (naming the option and its valid values); a suite
    # file with such values is bad input (moebench.suite: exit 2 before anything runs)
    validate: Callable[[dict], str | None] | None = None
    # the expert-GEMM dtypes (moebench.gemm_dtypes.GEMM_DTYPES) this backend has a path for. "default": the GEMMs in the
    # workload's dtype. Any other is passed to forward as gemm_dtype=...; a case asking for one not listed here is
    # `skipped` with the reason (never run in the workload dtype under the other's name)
    gemm_dtypes: tuple[str, ...] = ("default",)

    def why_not(self, device: str, dtype: str, shape: dict | None = None) -> str | None:
        """None when this backend can run the case here, else a one-line reason. shape["gemm_dtype"] (absent:
        "default") is checked against gemm_dtypes before `supports` sees it."""
        reason = self.available()
        if reason:
            return reason
        gemm = (shape or {}).get("gemm_dtype", "default")
        if gemm not in self.gemm_dtypes:
            return (f"{self.name} has no {gemm} expert-GEMM path (its gemm dtypes: {', '.join(self.gemm_dtypes)}); "
                    f"not run in the workload dtype under the {gemm} name")
        if device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {device}"
        if dtype not in self.dtypes:
            return f"{self.name} supports dtypes {', '.join(self.dtypes)}, not {dtype}"
        if self.supports is not None:
            return self.supports(device, dtype, shape or {})
        return None

    def call_options(self, case_options: dict, gemm_dtype: str = "default") -> dict:
        """The keyword arguments forward gets for a case: the defaults, the case's options, and gemm_dtype when it is
        not "default" (so backends without other GEMM dtypes keep their signature)."""
        return {**self.options, **case_options} | ({"gemm_dtype": gemm_dtype} if gemm_dtype != "default" else {})

    def sync_reason(self, device: str, dtype: str, gemm_dtype: str = "default") -> str | None:
        """Why a step of this backend syncs with the host here (so it cannot be graphed), or None. A backend with
        more than the default gemm dtype gets it as a third argument of host_sync / path when it is not default."""
        if not callable(self.host_sync):
            return self.host_sync
        return self.host_sync(device, dtype, *_gemm_arg(gemm_dtype))

    def path_taken(self, device: str, dtype: str, gemm_dtype: str = "default") -> str | None:
        return self.path(device, dtype, *_gemm_arg(gemm_dtype)) if self.path is not None else None


def _gemm_arg(gemm_dtype: str) -> tuple:
    return () if gemm_dtype == "default" else (gemm_dtype,)


def folded(base: Backend) -> Backend:
    """`<base>+shared`: the same kernels, with the model's shared experts folded in as always-on experts (MoMoE's
    shared experts: the last n_shared experts, routed to by every token with weight 1). The layer computes the same
    function; one expert block runs where there were two (experts, then a dense shared MLP). Each shared expert
    must have the routed experts' hidden size (d_shared unset or = d_expert), and be ungated (no
    shared_gate)."""
    if not base.dropless:
        raise ValueError(f"backend '{base.name}' drops tokens: shared experts folded into it could be dropped too")

    def supports(device, dtype, shape):
        if "n_shared" in shape and not shape["n_shared"]:  # (no shape given, as in `moebench list`: no verdict)
            return "this model has no shared experts to fold"
        if shape.get("shared_gate"):
            return ("the shared experts are gated per token (shared_gate): folded in as always-on experts "
                    "of weight 1 they would lose the gate")
        if shape.get("d_shared", shape.get("F")) != shape.get("F"):
            return (f"folding needs each shared expert's hidden size (d_shared={shape.get('d_shared')}) to equal "
                    f"d_expert ({shape.get('F')})")
        return base.supports(device, dtype, shape) if base.supports else None

    return dataclasses.replace(base, name=f"{base.name}+shared", folds_shared=True, supports=supports,
                               description=f"{base.description}; shared experts folded in as always-on experts")


REFERENCE = "naive"  # the backend every other one is checked against: it can never be replaced
_SOURCES: dict[str, str] = {}  # backend name -> the module that registered it


class RegistrationError(ValueError):
    """A backend name registered twice (a plugin replacing a built-in, `naive` included)."""


def _caller_module() -> str:
    import inspect
    for frame in inspect.stack()[2:]:
        mod = frame.frame.f_globals.get("__name__", "?")
        if mod != __name__:
            return mod
    return "?"


def register(backend: Backend) -> Backend:
    """Add a backend. A name can be registered once: a second registration (a plugin shadowing a built-in, or two
    plugins choosing one name) raises RegistrationError naming both sources, so no backend silently runs another's
    code under its name, and the reference `naive` can never be replaced."""
    if backend.weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"backend '{backend.name}': weight_layout '{backend.weight_layout}' is not one of "
                         f"{', '.join(WEIGHT_LAYOUTS)}")
    unknown = [g for g in backend.gemm_dtypes if g not in GEMM_DTYPES]
    if unknown or not backend.gemm_dtypes:
        raise ValueError(f"backend '{backend.name}': gemm_dtypes {backend.gemm_dtypes!r} must be one or more of "
                         f"{', '.join(GEMM_DTYPES)}")
    if not backend.dropless and backend.capacity is None:
        raise RegistrationError(f"backend '{backend.name}' drops tokens (dropless=False) but gives no capacity(): "
                                "parity could not check it against naive, so it cannot be registered")
    source = _caller_module()
    if backend.name in _REGISTRY:
        what = "the reference backend" if backend.name == REFERENCE else "backend"
        raise RegistrationError(f"{what} '{backend.name}' is already registered by {_SOURCES.get(backend.name, '?')}; "
                                f"{source} cannot register it again (choose another name)")
    _REGISTRY[backend.name] = backend
    _SOURCES[backend.name] = source
    return backend


def unregister(name: str) -> None:
    """Remove a backend registered by a test or plugin (never the reference)."""
    if name == REFERENCE:
        raise RegistrationError(f"the reference backend '{REFERENCE}' cannot be removed")
    _REGISTRY.pop(name, None)
    _SOURCES.pop(name, None)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a module that exists but failed to import is worth reporting
                _LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a broken optional backend must not break the registry
            _LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"
    for ep in metadata.entry_points(group="moebench.backends"):
        try:
            obj = ep.load()
            if isinstance(obj, Backend):
                register(obj)
        except Exception as e:  # noqa: BLE001 - a RegistrationError included: reported, the built-in stays
            _LOAD_ERRORS[f"entry point {ep.name}"] = f"{type(e).__name__}: {e}"
    for mod in _extra_modules():  # e.g. test-only backends, which must also exist in worker processes
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            _LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"


def _extra_modules() -> list[str]:
    """MOEBENCH_EXTRA_BACKENDS="pkg.mod,other.mod": more modules that register backends on import. Workers
    inherit the environment, so backends defined outside the package (tests/faultbackends.py) reach them."""
    return [m.strip() for m in os.environ.get("MOEBENCH_EXTRA_BACKENDS", "").split(",") if m.strip()]


def all_backends() -> dict[str, Backend]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def load_errors() -> dict[str, str]:
    _load_all()
    return dict(_LOAD_ERRORS)


class UnknownName(KeyError):
    """An unknown backend / suite / preset name; the message lists the valid names and the closest."""

    def __init__(self, kind: str, name: str, valid):
        valid = sorted(valid)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        self.message = f"unknown {kind} '{name}'.{hint} Valid {kind}s: {', '.join(valid)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def get(name: str) -> Backend:
    backends = all_backends()
    if name not in backends:
        raise UnknownName("backend", name, backends)
    return backends[name]
