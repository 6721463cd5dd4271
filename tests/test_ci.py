"""CI readiness (docs/ci.md): `moebench compare --format md` is one Markdown table a CI job can append to
$GITHUB_STEP_SUMMARY as it is (one line per row, warnings included), `--format json` carries every verdict and
the exit code the command exits with, and every moebench command and option docs/ci.md names exists.
Runs are SYNTHETIC (tests/data/synthetic.py): a planted 15% slow-down, not a measurement."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.spec import preset

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "ci.md"
_spec = importlib.util.spec_from_file_location("synthetic", HERE / "data" / "synthetic.py")
syn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(syn)
runner = CliRunner()


def _run(seed: int, slow: float = 1.0, env: dict | None = None) -> list[dict]:
    """naive and grouped_mm on one tiny model; grouped_mm's tokens/s times `slow`."""
    rng = np.random.default_rng(seed)
    return [syn.ok(syn.case(preset("tiny"), b, batch=2, seq=64, repeats=400), rng, tps * (slow if b == "grouped_mm"
                   else 1.0), n=400, precision=0.05, env=env) for b, tps in (("naive", 40_000.0), ("grouped_mm", 90_000.0))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ci")
    base = _run(11)
    new = _run(12, slow=0.85, env=syn.ENV | {"torch": "9.9+other"})
    new[0]["status"], new[0]["reason"] = "failed", "RuntimeError: boom\nsecond line | with a pipe"
    return str(syn.write(d / "base.jsonl", base)), str(syn.write(d / "new.jsonl", new)), base


def _cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_markdown_is_one_table_with_the_summary_and_warnings(planted):
    base, new, _ = planted
    res = runner.invoke(app, ["compare", base, new, "--format", "md"])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    table = [line for line in lines if line.startswith("|")]
    width = len(_cells(table[0]))
    assert all(len(_cells(line)) == width for line in table), table
    assert table == lines[:len(table)]                       # one block: no row broken over two lines
    assert any("| regression |" in line and "| grouped_mm |" in line for line in table)
    assert any("RuntimeError: boom second line \\| with a pipe" in line for line in table)
    assert res.stdout.split("\n\n")[1].startswith("2 regression(s)")  # the summary after the table
    assert "- warning: environments differ: torch 0.0+synthetic (base) vs 9.9+other (new)" in res.stdout


def test_json_carries_every_verdict_and_the_exit_code(planted):
    base, new, base_records = planted
    res = runner.invoke(app, ["compare", base, new, "--format", "json"])
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["exit_code"] == res.exit_code == 1
    assert out["regressions"] == 2   # grouped_mm's tokens/s, and naive ok -> failed
    keys = {r["case_key"] for r in base_records}
    assert out["rows"] and all(r["case_key"] in keys for r in out["rows"])
    assert {r["verdict"] for r in out["rows"]} <= {"regression", "improvement", "same", "noise", "not compared"}
    assert any("environments differ" in w for w in out["warnings"])
    same = runner.invoke(app, ["compare", base, base, "--format", "json"])
    assert json.loads(same.stdout[same.stdout.index("{"):])["exit_code"] == same.exit_code == 0


def _doc_commands() -> list[list[str]]:
    """Every `moebench ...` command line in docs/ci.md's code blocks, as words (continuations joined)."""
    text = DOC.read_text()
    blocks = re.findall(r"```(?:bash|yaml)\n(.*?)```", text, re.DOTALL)
    out = []
    for b in blocks:
        for line in b.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip().removeprefix("- run:").strip()
            if line.startswith("moebench "):
                out.append(line.split(">>")[0].split(">")[0].split("||")[0].split())
    return out


def test_every_command_and_option_in_docs_ci_exists():
    cmds = _doc_commands()
    assert {c[1] for c in cmds} == {"run", "compare"} and len(cmds) >= 6
    assert ["moebench", "run", "--suite", "ci", "--device", "cpu", "--strict"] == cmds[0][:7]
    helps = {}
    for c in cmds:
        helps.setdefault(c[1], runner.invoke(app, [c[1], "--help"], terminal_width=200).output)
        for opt in (w for w in c[2:] if w.startswith("--")):
            assert opt in helps[c[1]], f"docs/ci.md: `moebench {c[1]} {opt}` is not an option"
