"""Suites are data: TOML files that expand into Cases (model spec x backend x workload).

    description = "..."
    memory_budget_gib = 24          # optional: caps the GPU process, over it is status `oom`
    timeout_s = 600                 # per case
    backends = ["naive", "shuffle", "grouped_mm"]   # default for every [[matrix]]

    [[matrix]]                      # one or more; each expands as a product
    models = [{ preset = "tiny" }, { preset = "tiny", n_layers = 1, name = "tiny-1l" }]
    backends = ["naive", { name = "triton", recompute = 0 }]          # optional override
    [[matrix.workloads]]            # one or more; list values expand as a product
    level = "layer"
    mode = ["train", "forward"]
    batch = 4
    seq = 64
    routing = ["learned", "zipf:1.2"]    # or "trace:traces/mine.npz": a recorded routing (moebench/traces.py)

A trace path is relative to the suite file. Loading stores it in the case relative to the directory that holds
suites/ when the file lies under it (a shipped trace: "suites/traces/x.npz", the same key in every checkout),
absolute otherwise (traces.stored_path). Any problem is a SuiteError naming the file, the key path and what
was expected.
"""
from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moebench import registry, traces
from moebench.paths import SUITES_DIR
from moebench.spec import PRESETS, Case, ModelSpec, Workload, preset


class SuiteError(ValueError):
    pass


class Matrix(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[dict] = Field(min_length=1)
    workloads: list[dict] = Field(min_length=1)
    backends: list[str | dict] | None = Field(None, min_length=1)


class SuiteFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    memory_budget_gib: float | None = Field(None, gt=0, allow_inf_nan=False)
    timeout_s: float = Field(600, gt=0, le=7 * 86400)  # a week at most (and finite: the runner polls with it)
    precision: float = Field(0.01, gt=0, lt=1)         # timing: the 95% interval of the median within this ...
    max_time_s: float = Field(10.0, gt=0, le=86400)    # ... or this many seconds of timed steps per case
    backends: list[str | dict] = Field(["naive", "shuffle", "grouped_mm"], min_length=1)
    matrix: list[Matrix] = Field(min_length=1)


# old name -> suite: `h100` ran issue 8's layer shapes on whatever Hopper GPU was at hand; it is `layers` now
ALIASES = {"h100": "layers"}


def available_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.toml"))}


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise SuiteError(f"suite file {p} does not exist")
        return p
    suites = available_suites()
    name_or_path = ALIASES.get(name_or_path, name_or_path)
    if name_or_path not in suites:
        raise registry.UnknownName("suite", name_or_path, suites)
    return suites[name_or_path]


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part):
            continue  # pydantic's name for a branch of a union type, not a key of the file
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_msg(file: Path, prefix: str, e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(x for x in (prefix, _loc(err["loc"])) if x)
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    inp = err.get("input")
    shown = isinstance(inp, str) and repr(inp) in err["msg"]  # the validator's own message quotes the value
    got = f"; got {inp!r}" if "input" in err and not isinstance(inp, dict) and not shown else ""
    return f"{file}: {where or '<top level>'}: {err['msg']}{got}{more}"


def _product(d: dict) -> list[dict]:
    keys = list(d)
    vals = [v if isinstance(v, list) else [v] for v in d.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*vals)]


def _model(file: Path, where: str, entry: dict) -> ModelSpec:
    entry = dict(entry)
    name = entry.pop("preset", None)
    if "router" in entry and not isinstance(entry["router"], dict):
        raise SuiteError(f"{file}: {where}.router: must be a table such as {{ balance = \"aux\" }}; "
                         f"got {entry['router']!r}")
    try:
        if name is not None:
            if not isinstance(name, str) or name not in PRESETS:
                raise registry.UnknownName("preset", str(name), PRESETS)
            return preset(name, **entry)
        return ModelSpec.model_validate(entry)
    except registry.UnknownName as e:
        raise SuiteError(f"{file}: {where}.preset: {e}") from None
    except ValidationError as e:
        raise SuiteError(_pydantic_msg(file, where, e)) from None
    except TypeError as e:
        raise SuiteError(f"{file}: {where}: {e}") from None


def _backend(file: Path, where: str, entry: Any, only: set[str] | None) -> tuple[str, dict] | None:
    if isinstance(entry, str):
        name, opts = entry, {}
    else:
        opts = dict(entry)
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise SuiteError(f"{file}: {where}.name: a backend table needs name = \"...\"")
    valid = registry.all_backends()
    if name not in valid:
        raise SuiteError(f"{file}: {where}: {registry.UnknownName('backend', name, valid)}")
    unknown = set(opts) - set(valid[name].options)
    if unknown:
        ok = ", ".join(valid[name].options) or "none"
        raise SuiteError(f"{file}: {where}: backend '{name}' has no option(s) {', '.join(sorted(unknown))}; "
                         f"its options: {ok}")
    for k, v in opts.items():
        default = valid[name].options[k]
        kinds = (int, float) if type(default) is float else type(default)
        if default is not None and (not isinstance(v, kinds) or isinstance(v, bool) != isinstance(default, bool)):
            raise SuiteError(f"{file}: {where}.{k}: backend '{name}' option {k} takes a {type(default).__name__} "
                             f"(default {default!r}); got {v!r}")
    bad = valid[name].validate({**valid[name].options, **opts}) if valid[name].validate else None
    if bad:
        raise SuiteError(f"{file}: {where}: backend '{name}': {bad}")
    if only is not None and name not in only:
        return None
    return name, opts


def _resolve_trace(file: Path, wd: dict) -> dict:
    """routing = "trace:<path relative to the suite file>" -> the path a case stores (traces.stored_path)."""
    r = wd.get("routing")
    if not (isinstance(r, str) and r.startswith("trace:") and r[len("trace:"):].strip()):
        return wd
    p = Path(r[len("trace:"):]).expanduser()
    return {**wd, "routing": "trace:" + traces.stored_path(p if p.is_absolute() else file.parent / p)}


def load(name_or_path: str, *, device: str = "cpu", backends: list[str] | None = None,
         precision: float | None = None, max_time_s: float | None = None, execs: list[str] | None = None) -> list[Case]:
    """Load, validate and expand a suite. `backends` restricts the suite's backends (unknown: error);
    precision / max_time_s override the suite's timing policy; execs replaces every workload's execution mode
    (one case per mode given)."""
    file = resolve(name_or_path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8-sig"))  # -sig: a UTF-8 BOM (some editors write one)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{file}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{file}: cannot read: {e}") from None
    try:
        sf = SuiteFile.model_validate(raw)
    except ValidationError as e:
        raise SuiteError(_pydantic_msg(file, "", e)) from None
    only = None
    if backends:
        valid = registry.all_backends()
        for b in backends:
            if b not in valid:
                raise registry.UnknownName("backend", b, valid)
        only = set(backends)
    cases, suite_name = [], file.stem
    for mi, mx in enumerate(sf.matrix):
        models = [_model(file, f"matrix[{mi}].models[{j}]", m) for j, m in enumerate(mx.models)]
        bes = [b for j, e in enumerate(mx.backends if mx.backends is not None else sf.backends)
               if (b := _backend(file, f"matrix[{mi}].backends[{j}]", e, only)) is not None]
        for wi, wraw in enumerate(mx.workloads):
            for k, v in wraw.items():
                if v == []:
                    raise SuiteError(f"{file}: matrix[{mi}].workloads[{wi}].{k}: an empty list expands to no "
                                     "workloads; give one value or a list of values")
            for wd in [d | ({"exec": e} if e else {}) for d in _product(wraw) for e in (execs or [None])]:
                wd = _resolve_trace(file, wd)
                try:
                    wl = Workload.model_validate(wd)
                except ValidationError as e:
                    raise SuiteError(_pydantic_msg(file, f"matrix[{mi}].workloads[{wi}]", e)) from None
                for model in models:
                    for name, opts in bes:
                        try:
                            cases.append(Case(model=model, backend=name, backend_options=opts, workload=wl,
                                              suite=suite_name, device=device, timeout_s=sf.timeout_s,
                                              memory_budget_gib=sf.memory_budget_gib,
                                              precision=precision or sf.precision,
                                              max_time_s=max_time_s or sf.max_time_s))
                        except ValidationError as e:
                            raise SuiteError(_pydantic_msg(file, f"matrix[{mi}] ({model.name})", e)) from None
    seen, unique = set(), []
    for c in cases:
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    return unique


def describe(name_or_path: str) -> str:
    file = resolve(name_or_path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8-sig")).get("description", "")
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
        return "(unreadable)"
