"""Ad-hoc cases without a suite file: `moebench run --model qwen3-30b-a3b-layer --tokens 16384 --backends
grouped_mm,triton` or `--shape D=2048,F=768,E=128,K=8`, with --mode, --dtype, --routing (comma lists expand as
a product, as list values in a suite do), --level, --seq and --exec. The same validation as a suite file: any
problem is a SuiteError naming the option and the valid choices (exit code 2 in the CLI).

Legend (--shape keys): D model dim, F expert hidden, E experts, K top-k, S shared experts (optional, each of
F). A --shape is a layer-only spec like the `<name>-layer` presets (n_heads 1, the default router), named by
its shape. A trace path in --routing is relative to the working directory (stored as traces.stored_path says).
"""
from __future__ import annotations

import itertools
from pathlib import Path

from pydantic import ValidationError

from moebench import registry, traces
from moebench.spec import PRESETS, Case, ModelSpec, Workload, preset
from moebench.suite import SuiteError, SuiteFile

SHAPE_KEYS = {"D": "d_model", "F": "d_expert", "E": "n_experts", "K": "top_k", "S": "n_shared_experts"}
SHAPE_HELP = "keys D, F, E, K (required) and S (shared experts), e.g. D=2048,F=768,E=128,K=8"
# a Workload field -> the option that sets it
OPTION_OF = {"level": "--level", "mode": "--mode", "dtype": "--dtype", "routing": "--routing",
             "exec": "--exec", "seq": "--seq", "batch": "--tokens"}


def parse_shape(text: str) -> ModelSpec:
    fields = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, val = part.partition("=")
        key = key.strip()
        if key not in SHAPE_KEYS or not eq:
            raise SuiteError(f"--shape: '{part}' is not KEY=VALUE with a known key; {SHAPE_HELP}")
        if not val.strip().isdigit() or int(val) < (0 if key == "S" else 1):
            kind = "non-negative" if key == "S" else "positive"
            raise SuiteError(f"--shape: {key} must be a {kind} integer, got '{val.strip()}'")
        fields[SHAPE_KEYS[key]] = int(val)
    missing = [k for k in ("D", "F", "E", "K") if SHAPE_KEYS[k] not in fields]
    if missing:
        raise SuiteError(f"--shape: missing {', '.join(missing)}; {SHAPE_HELP}")
    name = "shape-" + "-".join(f"{k}{fields[v]}" for k, v in SHAPE_KEYS.items() if v in fields)
    try:
        return ModelSpec(name=name, n_heads=1, **fields)
    except ValidationError as e:
        raise SuiteError(f"--shape: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _model(model: str | None, shape: str | None) -> ModelSpec:
    if (model is None) == (shape is None):
        raise SuiteError("give one of --model (a preset) or --shape (D=..,F=..,E=..,K=..), not "
                         + ("both" if model else "neither"))
    if shape is not None:
        return parse_shape(shape)
    if model not in PRESETS:
        raise SuiteError(f"--model: {registry.UnknownName('preset', model, PRESETS)}")
    return preset(model)


def _routing(r: str) -> str:
    if r.startswith("trace:") and r[len("trace:"):].strip():
        return "trace:" + traces.stored_path(Path(r[len("trace:"):]))
    return r


def cases(*, model: str | None = None, shape: str | None = None, tokens: int = 4096, seq: int | None = None,
          backends: list[str] | None = None, level: str = "layer", mode: list[str] | None = None,
          dtype: list[str] | None = None, routing: list[str] | None = None, exec_: str | None = None,
          device: str = "cpu", timeout_s: float = 600) -> list[Case]:
    """The cases of one ad-hoc run: the model (or shape) x backends x the product of modes, dtypes and
    routings."""
    spec = _model(model, shape)
    if tokens < 1:
        raise SuiteError(f"--tokens must be >= 1, got {tokens}")
    if seq is None:
        seq = tokens if level == "layer" else min(tokens, spec.max_seq_len)
    if seq < 1 or tokens % seq:
        raise SuiteError(f"--tokens ({tokens}) must be a multiple of --seq ({seq}): batch = tokens / seq")
    valid = registry.all_backends()
    names = backends or list(SuiteFile.model_fields["backends"].default)
    for b in names:
        if b not in valid:
            raise SuiteError(f"--backends: {registry.UnknownName('backend', b, valid)}")
    out, seen = [], set()
    for m, dt, r in itertools.product(mode or ["train"], dtype or ["float32"], routing or ["learned"]):
        wd = {"level": level, "mode": m, "dtype": dt, "routing": _routing(r), "batch": tokens // seq,
              "seq": seq}
        if exec_ is not None:
            wd["exec"] = exec_
        try:
            wl = Workload.model_validate(wd)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            bad = err.get("input")
            got = f"; got {bad!r}" if not isinstance(bad, dict) and str(bad) not in msg else ""
            raise SuiteError(f"{OPTION_OF.get(field, '--' + field)}: {msg}{got}") from None
        for b in names:
            try:
                c = Case(model=spec, backend=b, workload=wl, device=device, timeout_s=timeout_s)
            except ValidationError as e:
                msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                opt = "--routing" if "routing" in msg else "--seq" if "seq" in msg else "--model"
                raise SuiteError(f"{opt}: {msg}") from None
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
    return out
