"""Ad-hoc runs without a suite file (moebench/adhoc.py, `moebench run --model/--shape`): the cases they expand
to, and bad input as one clear line naming the option and the valid choices, exit code 2, nothing written."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moebench import adhoc
from moebench.cli import app
from moebench.spec import PRESETS, Workload
from moebench.suite import SuiteError

runner = CliRunner()


def test_model_preset_cases():
    cs = adhoc.cases(model="qwen3-30b-a3b-layer", tokens=16384, backends=["grouped_mm", "triton"])
    assert [c.backend for c in cs] == ["grouped_mm", "triton"]
    for c in cs:
        assert c.model == PRESETS["qwen3-30b-a3b-layer"] and c.suite == "adhoc"
        w = c.workload
        assert (w.level, w.tokens, w.batch, w.mode) == ("layer", 16384, 1, "train")


def test_shape_cases_expand_modes_dtypes_routings():
    cs = adhoc.cases(shape="D=2048,F=768,E=128,K=8,S=1", tokens=1024, backends=["grouped_mm"],
                     mode=["train", "forward"], dtype=["bfloat16"], routing=["uniform", "zipf:1.2"])
    assert len(cs) == 4 and len({c.key for c in cs}) == 4
    m = cs[0].model
    got = (m.d_model, m.d_expert, m.n_experts, m.top_k, m.n_shared_experts, m.n_heads)
    assert got == (2048, 768, 128, 8, 1, 1)
    assert m.name == "shape-D2048-F768-E128-K8-S1"
    assert {(c.workload.mode, c.workload.routing) for c in cs} == {
        (a, b) for a in ("train", "forward") for b in ("uniform", "zipf:1.2")}


def test_model_level_splits_tokens_into_sequences():
    (c,) = adhoc.cases(model="tiny", tokens=256, level="model", backends=["naive"])
    assert (c.workload.batch, c.workload.seq) == (2, 128)  # tiny's max_seq_len is 128


def test_exec_is_passed_only_when_given():
    (c,) = adhoc.cases(model="tiny-layer", tokens=64, backends=["naive"])
    assert "exec" not in c.workload.model_dump(exclude_defaults=True)
    if "exec" in Workload.model_fields:  # once the field lands on this branch
        (c,) = adhoc.cases(model="tiny-layer", tokens=64, backends=["naive"], exec_="compile")
        assert c.workload.exec == "compile"
    else:
        with pytest.raises(SuiteError, match="--exec compile: .*no exec field"):
            adhoc.cases(model="tiny-layer", tokens=64, backends=["naive"], exec_="compile")


@pytest.mark.parametrize("kw, must_say", [
    ({"model": "qwen3-30b-a3b-layr"}, ["--model", "Did you mean 'qwen3-30b-a3b-layer'", "Valid presets"]),
    ({"shape": "D=2048,F=768,E=128"}, ["--shape", "missing K", "D=2048,F=768,E=128,K=8"]),
    ({"shape": "D=2048,F=768,E=8,K=9"}, ["--shape", "top_k (9) must be <= n_experts (8)"]),
    ({"shape": "D=2048,X=1,E=8,K=2"}, ["--shape", "'X=1'", "keys D, F, E, K"]),
    ({"shape": "D=abc,F=7,E=8,K=2"}, ["--shape", "D must be a positive integer, got 'abc'"]),
    ({"model": "tiny-layer", "shape": "D=8,F=8,E=4,K=2"}, ["--model", "--shape", "not both"]),
    ({}, ["--model", "--shape", "neither"]),
    ({"model": "tiny-layer", "backends": ["grouped-mm"]}, ["--backends", "Did you mean 'grouped_mm'"]),
    ({"model": "tiny-layer", "mode": ["fwd"]}, ["--mode", "'train' or 'forward'", "'fwd'"]),
    ({"model": "tiny-layer", "dtype": ["bf16"]}, ["--dtype", "'float32', 'bfloat16' or 'float16'"]),
    ({"model": "tiny-layer", "routing": ["zipf"]},
     ["--routing", "learned, uniform, zipf:<s>, hot:<k> or trace"]),
    ({"model": "tiny-layer", "routing": ["hot:9"]}, ["--routing", "more hot experts than n_experts (6)"]),
    ({"model": "tiny-layer", "routing": ["trace:/nonexistent/t.npz"]}, ["--routing", "t.npz does not exist"]),
    ({"model": "tiny-layer", "level": "block"}, ["--level", "'layer', 'model' or 'train-run'"]),
    ({"model": "tiny-layer", "tokens": 100, "seq": 30}, ["--tokens (100) must be a multiple of --seq (30)"]),
])
def test_bad_input_names_the_option(kw, must_say):
    with pytest.raises(SuiteError) as e:
        adhoc.cases(**kw)
    for s in must_say:
        assert s in str(e.value), str(e.value)


def test_cli_run_ad_hoc_lists_cases():
    res = runner.invoke(app, ["run", "--model", "qwen3-30b-a3b-layer", "--tokens", "16384", "--backends",
                              "grouped_mm,triton", "--device", "cpu", "--list-cases"])
    assert res.exit_code == 0, res.output
    assert "qwen3-30b-a3b-layer | grouped_mm | layer/train float32 T=16384 learned" in res.output
    res = runner.invoke(app, ["run", "--shape", "D=64,F=32,E=8,K=2", "--mode", "train,forward", "--routing",
                              "uniform,zipf:1.2", "--dtype", "float32", "--device", "cpu", "--list-cases",
                              "--backends", "naive"])
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == 4, res.output


@pytest.mark.parametrize("args, must_say", [
    (["--model", "nope"], "--model: unknown preset 'nope'"),
    (["--shape", "D=64,F=32"], "--shape: missing E, K"),
    (["--suite", "ci", "--model", "tiny-layer"], "give --suite or --model/--shape, not both"),
    (["--suite", "ci", "--tokens", "64"], "--tokens: for ad-hoc runs with --model or --shape"),
    (["--model", "tiny-layer", "--routing", "zipf"], "--routing: routing must be"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, must_say):
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["run", *args, "--device", "cpu", "--out", str(out)])
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and must_say in lines[0], res.output
    assert not out.exists()


def test_cli_ad_hoc_run_records_a_case(tmp_path):
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["run", "--shape", "D=32,F=16,E=4,K=2", "--tokens", "64", "--backends",
                              "grouped_mm", "--routing", "zipf:1.2", "--device", "cpu", "--out", str(out),
                              "--no-report", "--worker", "reuse"])
    assert res.exit_code == 0, res.output
    import json
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["status"] == "ok" and rec["suite"] == "adhoc"
    assert rec["case"]["workload"]["routing"] == "zipf:1.2"
