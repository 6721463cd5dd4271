"""Bad input, fuzzed (hypothesis): suite files and `moebench run` arguments. Whatever the input, the command
exits 0 (valid) or 2 with one message that names the file (or option) and the key; never a traceback, and
never a results file created or extended. Nothing is run: the runner is replaced by a stub that records
whether it was reached, so a valid mutant costs microseconds.
"""
from __future__ import annotations

import datetime
import json
import math
import string

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moebench import registry, runner
from moebench.cli import app
from moebench.spec import PRESETS

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BASE = {  # a valid suite touching every table: top level, matrix, preset and custom models, router, options
    "description": "fuzz base",
    "timeout_s": 30,
    "backends": ["naive", "shuffle"],
    "matrix": [
        {"models": [{"preset": "tiny-layer"},
                    {"name": "custom", "d_model": 32, "d_expert": 16, "n_experts": 8, "top_k": 2, "n_heads": 4,
                     "router": {"n_group": 2, "topk_group": 1}}],
         "workloads": [{"level": "layer", "mode": ["train", "forward"], "batch": 1, "seq": 8,
                        "routing": "zipf:1.2"}]},
        {"models": [{"preset": "tiny", "n_layers": 1}],
         "backends": ["naive", {"name": "fault-nan", "nan_from_call": 3}],
         "workloads": [{"level": "model", "batch": 2, "seq": 16, "repeats": 2}]},
    ],
}


# ------------------------------------------------------------------------------------------------ helpers
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, datetime.date):
        return v.isoformat()
    return "{ " + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}" for k, x in v.items()) + " }"


def to_toml(d: dict) -> str:
    return "".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in d.items())


def paths(x, prefix=()):
    """Every key path in a nested dict/list, e.g. ("matrix", 0, "models", 1, "router", "n_group")."""
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
    for k, v in items:
        yield prefix + (k,)
        yield from paths(v, prefix + (k,))


def render(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def mutate(doc: dict, path, value=None, delete=False) -> dict:
    doc = json.loads(json.dumps(doc))
    *head, last = path
    parent = doc
    for p in head:
        parent = parent[p]
    if delete:
        del parent[last]
    else:
        parent[last] = value
    return doc


def named(msg: str, path) -> bool:
    """The message names the key: its name, or the entry (models[1], workloads[0], ...) it sits in."""
    keys = [p for p in path if isinstance(p, str)]
    last_entry = max((i for i, p in enumerate(path) if isinstance(p, int)), default=None)
    entry = render(path[:last_entry + 1]) if last_entry is not None else None
    return keys[-1] in msg or (entry is not None and (entry + ":" in msg or entry + "." in msg))


def at(path):
    x = BASE
    for p in path:
        x = x[p]
    return x


ALL_PATHS = list(paths(BASE))
DICT_PATHS = [()] + [p for p in ALL_PATHS if isinstance(at(p), dict)]
INT_LEAVES = [p for p in ALL_PATHS if type(at(p)) is int]

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=12)
VALUES = st.recursive(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 12), st.floats(), st.booleans(), text, st.dates(),
              st.sampled_from(["naive", "tiny", "layer", "model", "hot:99", "zipf:0", "learned", "uniform"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=2)),
    max_leaves=4,
)


@pytest.fixture
def fuzz_env(fault_backends, tmp_path, monkeypatch):
    """A results path and a runner stub that notes whether the command got as far as running anything."""
    calls = []

    def stub(cases, out, **kw):
        calls.append(len(cases))
        return runner.RunSummary(out=out, run_id=kw.get("run_id") or "stub")

    monkeypatch.setattr(runner, "run", stub)
    return tmp_path, calls


def invoke(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(res.exception, Exception), f"{type(res.exception).__name__}: {res.exception}"
    assert "Traceback" not in res.output, res.output
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    return res


def one_error(res) -> str:
    lines = [ln for ln in res.stderr.split("\n") if ln.strip()]  # only a real newline starts a new line
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def run_suite(fuzz_env, doc_text: str | bytes, *, existing: bytes | None = None):
    """`moebench run --suite <file> --out <results>`; returns (result, message or None)."""
    tmp_path, calls = fuzz_env
    suite, out = tmp_path / "fuzz.toml", tmp_path / "results.jsonl"
    suite.write_bytes(doc_text if isinstance(doc_text, bytes) else doc_text.encode())
    out.unlink(missing_ok=True)
    if existing is not None:
        out.write_bytes(existing)
    calls.clear()
    res = invoke(["run", "--suite", suite, "--out", out, "--device", "cpu", "--no-report"])
    if res.exit_code == 0:
        assert calls, "exit 0 without running the suite"
        return res, None
    msg = one_error(res)
    assert msg.startswith(f"error: {suite}: "), msg
    assert not calls, "the runner was reached although the suite is invalid"
    if existing is None:
        assert not out.exists(), "a results file was created for an invalid suite"
    else:
        assert out.read_bytes() == existing, "the results file was changed for an invalid suite"
    return res, msg


# ------------------------------------------------------------------------------------------------ suites
def test_base_suite_is_valid(fuzz_env):
    res, msg = run_suite(fuzz_env, to_toml(BASE))
    assert msg is None and fuzz_env[1] == [2 * 2 * 2 + 2], res.output


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_bytes_are_one_clear_error(fuzz_env, junk):
    res, _ = run_suite(fuzz_env, junk)
    assert res.exit_code == 2


@FUZZ
@given(st.sampled_from(ALL_PATHS), VALUES, st.booleans())
def test_mutated_suite_is_valid_or_names_the_key(fuzz_env, path, value, delete):
    res, msg = run_suite(fuzz_env, to_toml(mutate(BASE, path, value, delete)))
    event(f"exit {res.exit_code}")  # both outcomes occur (pytest --hypothesis-show-statistics)
    if msg is not None:
        assert named(msg, path), (render(path), msg)


@FUZZ
@given(st.text(max_size=300).flatmap(lambda s: st.tuples(st.just(s), st.integers(0, 10**6), st.text(max_size=3))))
def test_text_mutations_of_a_valid_suite(fuzz_env, mutation):
    _, at_, insert = mutation
    good = to_toml(BASE)
    i = at_ % (len(good) + 1)
    run_suite(fuzz_env, good[:i] + insert + good[i + 3:])  # exit 0, or exit 2 with one message naming the file


@FUZZ
@given(st.data())
def test_invalid_suites_exit_2_naming_the_key(fuzz_env, data):
    kind = data.draw(st.sampled_from(["size", "top_k", "n_group", "unknown key", "preset", "backend", "type",
                                      "option type"]))
    custom = ("matrix", 0, "models", 1)
    if kind == "size":  # negative or zero sizes
        path = data.draw(st.sampled_from([p for p in INT_LEAVES if p[-1] != "nan_from_call"]))
        value = data.draw(st.integers(-(2**31), 0))
    elif kind == "top_k":  # top_k > n_experts
        path, value = custom + ("top_k",), data.draw(st.integers(9, 2**31))
    elif kind == "n_group":  # n_group does not divide E = 8
        path, value = custom + ("router", "n_group"), data.draw(st.integers(3, 999).filter(lambda n: 8 % n))
    elif kind == "unknown key":
        parent = data.draw(st.sampled_from(DICT_PATHS))
        key = "x_" + data.draw(st.text(string.ascii_letters + "_", max_size=8))
        path, value = parent + (key,), data.draw(VALUES)
    elif kind == "preset":
        path = ("matrix", data.draw(st.sampled_from([0, 1])), "models", 0, "preset")
        value = data.draw(text.filter(lambda s: s not in PRESETS))
    elif kind == "backend":
        path = data.draw(st.sampled_from([("backends", 1), ("matrix", 1, "backends", 1, "name")]))
        value = data.draw(text.filter(lambda s: s not in registry.all_backends()))
    elif kind == "type":  # a table, a list or a word where a number goes
        path = data.draw(st.sampled_from([p for p in INT_LEAVES if p != ("timeout_s",)]))  # a float key
        value = data.draw(st.one_of(st.text(string.ascii_letters, min_size=1), st.just({"a": 1}),
                                    st.floats(0.1, 0.9), st.lists(st.just("x"), min_size=1, max_size=2)))
    else:  # a backend option of the wrong type
        path = ("matrix", 1, "backends", 1, "nan_from_call")
        value = data.draw(st.one_of(text, st.floats(), st.booleans(), st.just([1]), st.dates()))
    existing = data.draw(st.sampled_from([None, b'{"schema": 1}\n']))
    res, msg = run_suite(fuzz_env, to_toml(mutate(BASE, path, value)), existing=existing)
    assert res.exit_code == 2, (kind, render(path), value, res.output)
    assert named(msg, path), (kind, render(path), msg)


# ------------------------------------------------------------------------------------------- CLI arguments
NAMES = st.sampled_from(["naive", "shuffle", "fault-nan", "nope", "", "naive ", "NAIVE", "ci", "cpu", "cuda"])
OPTIONS = {"--backends": st.lists(st.one_of(NAMES, text), min_size=1, max_size=3).map(",".join),
           "--device": st.one_of(NAMES, text), "--worker": st.one_of(st.sampled_from(["reuse", "auto"]), text),
           "--suite": st.one_of(NAMES, st.text(string.ascii_letters + string.digits + "-_.", min_size=1,
                                               max_size=12)),
           "--nproc": st.integers(-5, 0).map(str)}


@FUZZ
@given(st.sampled_from(sorted(OPTIONS)).flatmap(lambda o: st.tuples(st.just(o), OPTIONS[o])))
@example(("--backends", "naive,[/]"))  # echoed input must not be read as rich markup
@example(("--suite", "[bold]x"))
def test_bad_arguments_exit_2_naming_the_option(fuzz_env, opt_value):
    tmp_path, calls = fuzz_env
    opt, value = opt_value
    suite = tmp_path / "ok.toml"
    suite.write_text(to_toml(BASE))
    out = tmp_path / "args.jsonl"
    args = {"--suite": suite, "--device": "cpu", "--out": out} | {opt: value}
    calls.clear()
    res = invoke(["run", "--no-report", *[x for kv in args.items() for x in kv]])
    assert not out.exists()
    if res.exit_code == 0:
        return
    assert not calls
    if opt == "--nproc":  # typer's own range check
        assert "--nproc" in res.output
        return
    msg = one_error(res)
    assert opt in msg or f"{value}" in msg, msg


def test_unknown_option_exits_2():
    res = invoke(["run", "--suite", "ci", "--no-such-option", "1"])
    assert res.exit_code == 2 and "--no-such-option" in res.output
