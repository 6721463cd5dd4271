"""moebench.claims (the seeds' claims as data, claims_frame's verdicts) and the suites that answer users'
questions: seeds, l4's full-stack comparison, scaling and h100.

Records here are built from the real suite files with made-up metrics: they test the verdict logic and that
the claims find the rows the suites produce, never a measured number.
"""
import math

import pandas as pd
import pytest

from moebench import claims
from moebench.claims import CLAIMS, COLUMNS, claims_frame
from moebench.results import make_record, to_frame
from moebench.spec import Case, Workload, preset
from moebench.suite import load

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda"}
L4 = {"gpu": "NVIDIA L4", "device": "cuda"}
SEEDS = ("MoEForge", "Optimal MoE LM", "SparseMoE", "MoMoE", "MoE Transformer")
VERDICTS = {"reproduced", "not reproduced", "not comparable"}


def rec(case: Case, env: dict, status="ok", tps=None, peak=None, maxvio=None, reason=""):
    m = {}
    if tps is not None:
        m["tokens_per_s"] = {"p20": tps, "p50": tps, "p80": tps}
    if peak is not None:
        m["memory"] = {"peak_allocated_gib": peak}
    if maxvio is not None:
        m["balance"] = {"global": {"maxvio": maxvio}}
    return make_record(case, status, run_id="t", env=env, reason=reason, metrics=m)


def by_claim(cf: pd.DataFrame, text: str) -> pd.Series:
    rows = cf[cf["claim"].str.contains(text, regex=False)]
    assert len(rows) == 1, text
    return rows.iloc[0]


def cases(suite: str) -> dict[str, Case]:
    return {c.model.name + "|" + c.backend: c for c in load(suite, device="cuda", execs=["eager"])}


# ------------------------------------------------------------------------------------------ claims data
def test_every_seed_has_claims_and_every_claim_is_complete():
    assert {c.seed for c in CLAIMS} == set(SEEDS)
    for c in CLAIMS:
        assert c.claim and c.compared and c.claimed_device and c.kind in claims.EVALUATORS
        assert c.claimed is None or isinstance(c.claimed, (int, float, str))
    # one row per claim, no claim twice
    assert len({(c.seed, c.claim) for c in CLAIMS}) == len(CLAIMS)


def test_empty_results_give_one_honest_row_per_claim():
    cf = claims_frame(pd.DataFrame())
    assert list(cf.columns) == COLUMNS and len(cf) == len(CLAIMS)
    assert set(cf["verdict"]) <= VERDICTS
    measured_rows = cf[cf["measured"].notna()]
    # with no results, only the device-free parameter counts have a measured value
    assert set(CLAIMS[i].kind for i in measured_rows.index) == {"params"}
    assert by_claim(cf, "Medium: 644M")["verdict"] == "reproduced"
    assert by_claim(cf, "Small: 77M")["verdict"] == "not reproduced"
    assert by_claim(cf, "XL (32 experts)")["verdict"] == "not comparable"
    assert "not measured" in by_claim(cf, "Small: 52,805 TPS")["why"]


def test_claims_name_only_models_the_suites_produce():
    names = {c.model.name for s in ("seeds", "l4") for c in load(s, device="cuda")}
    for c in CLAIMS:
        for key in ("model", "den"):
            if c.args.get(key):
                assert c.args[key] in names, (c.claim, c.args[key])
        if c.args.get("num"):
            assert any(n.startswith(c.args["num"]) for n in names), c.claim


# ---------------------------------------------------------------------------------------------- verdicts
def test_absolute_throughput_only_compares_on_the_claimed_gpu():
    seeds = cases("seeds")
    small = seeds["moeforge-small+moeforge-stack|shuffle"]
    on_h100 = claims_frame(to_frame([rec(small, H100, tps=90000.0, peak=2.0)]))
    row = by_claim(on_h100, "Small: 52,805 TPS")
    assert row["verdict"] == "not comparable" and row["measured"] == 90000
    assert "H100" in row["measured_device"]
    for tps, verdict in ((52805 * 1.05, "reproduced"), (52805 * 0.5, "not reproduced")):
        row = by_claim(claims_frame(to_frame([rec(small, L4, tps=tps, peak=2.0)])), "Small: 52,805 TPS")
        assert row["verdict"] == verdict, row["why"]
    # an L40S is not an L4
    l40s = {"gpu": "NVIDIA L40S", "device": "cuda"}
    row = by_claim(claims_frame(to_frame([rec(small, l40s, tps=52805.0)])), "Small: 52,805 TPS")
    assert row["verdict"] == "not comparable"
    # 8xA100 claims never compare with a one-GPU run
    base = seeds["switch-base|grouped_mm"]
    a100 = {"gpu": "NVIDIA A100-SXM4-80GB", "device": "cuda"}
    cf = claims_frame(to_frame([rec(base, a100, tps=2100.0, peak=4.2)]))
    assert by_claim(cf, "Base: 2,100 tokens/s")["verdict"] == "not comparable"
    assert by_claim(cf, "Base: 4.2 GB")["verdict"] == "not comparable"   # batch size never published


def test_memory_compares_across_gpus_in_gb():
    small = cases("seeds")["moeforge-small+moeforge-stack|shuffle"]
    gib_for_3gb = 3.0e9 / 2**30
    row = by_claim(claims_frame(to_frame([rec(small, H100, tps=1.0, peak=gib_for_3gb)])), "Small: 3.0 GB")
    assert row["verdict"] == "reproduced" and row["measured"] == pytest.approx(3.0)
    row = by_claim(claims_frame(to_frame([rec(small, H100, tps=1.0, peak=gib_for_3gb * 2)])), "Small: 3.0 GB")
    assert row["verdict"] == "not reproduced"


def test_skipped_case_explains_the_missing_measurement():
    small = cases("seeds")["moeforge-small+moeforge-stack|shuffle"]
    cf = claims_frame(to_frame([rec(small, H100, status="skipped", reason="liger-kernel not installed")]))
    row = by_claim(cf, "Small: 52,805 TPS")
    assert row["verdict"] == "not comparable" and "skipped" in row["why"] and "liger-kernel" in row["why"]


def _stack_records(naive=(1000.0, 10.0), opts=((1500.0, 8.0), (2500.0, 4.5))):
    l4 = cases("l4")
    recs = [rec(l4["moeforge-medium+naive-stack|naive"], H100, tps=naive[0], peak=naive[1])]
    opt_cases = [c for k, c in l4.items() if k.startswith("moeforge-medium+opt-")]
    assert len(opt_cases) >= len(opts)
    for c, (tps, peak) in zip(opt_cases, opts):
        recs.append(rec(c, H100, tps=tps, peak=peak))
    for c in opt_cases[len(opts):]:
        recs.append(rec(c, H100, status="skipped", reason="liger-kernel not installed"))
    return recs


def test_full_stack_ratios_use_the_fastest_optimised_stack():
    cf = claims_frame(to_frame(_stack_records()))
    speed, mem = by_claim(cf, "66% faster"), by_claim(cf, "47% less memory")
    assert speed["measured"] == 2.5 and speed["verdict"] == "reproduced"
    assert mem["measured"] == 0.45 and mem["verdict"] == "reproduced"   # the fastest stack's memory, 4.5 / 10
    cf = claims_frame(to_frame(_stack_records(opts=((1200.0, 9.0),))))
    assert by_claim(cf, "66% faster")["verdict"] == "not reproduced"
    assert by_claim(cf, "47% less memory")["verdict"] == "not reproduced"
    assert "H100" in by_claim(cf, "66% faster")["measured_device"]


def test_full_stack_without_an_optimised_run_says_why():
    cf = claims_frame(to_frame(_stack_records(opts=())))
    row = by_claim(cf, "66% faster")
    assert row["verdict"] == "not comparable" and "liger-kernel not installed" in row["why"]


def _balance_frame(aux_maxvio, bias_maxvio, router_col=True):
    wl = Workload(level="model", mode="train", batch=4, seq=64, routing="learned")
    recs = []
    for bal, mv in (("aux", aux_maxvio), ("bias", bias_maxvio)):
        spec = preset("optimal-moe-lm", name=f"optimal-moe-lm-{bal}", router={"balance": bal})
        c = Case(model=spec, backend="grouped_mm", workload=wl, suite="balance", device="cuda")
        recs.append(rec(c, H100, tps=1.0, maxvio=mv))
    df = to_frame(recs)
    if router_col:
        df["router"] = ["softmax aux a=0.01", "softmax bias u=0.001 z=0.001"]
    return df


def test_balance_claim_is_a_ratio_of_maxvio():
    row = by_claim(claims_frame(_balance_frame(0.8, 0.08)), "8-13x better balance")
    assert row["measured"] == 10.0 and row["verdict"] == "reproduced"
    row = by_claim(claims_frame(_balance_frame(0.8, 0.4)), "8-13x better balance")
    assert row["measured"] == 2.0 and row["verdict"] == "not reproduced"
    row = by_claim(claims_frame(_balance_frame(0.8, 0.08, router_col=False)), "8-13x better balance")
    assert row["verdict"] == "not comparable" and "router column" in row["why"]


def test_recompute_claims_read_the_triton_option():
    wl = Workload(level="layer", mode="train", batch=4, seq=4096, dtype="bfloat16")
    spec = preset("momoe-layer")

    def mk(backend, opts, peak):
        case = Case(model=spec, backend=backend, backend_options=opts, workload=wl, device="cuda")
        return rec(case, H100, tps=1.0, peak=peak)

    cf = claims_frame(to_frame([mk("triton", {"recompute": 0}, 3.0), mk("triton", {"recompute": 100}, 4.0),
                                mk("grouped_mm", {}, 5.0)]))
    assert by_claim(cf, "save_percent=0")["measured"] == 0.75
    assert by_claim(cf, "save_percent=0")["verdict"] == "reproduced"
    assert by_claim(cf, "save_percent=100")["measured"] == 0.8
    cf = claims_frame(to_frame([mk("triton", {"recompute": 0}, 4.0), mk("triton", {"recompute": 100}, 4.0)]))
    assert by_claim(cf, "save_percent=0")["verdict"] == "not reproduced"
    assert by_claim(cf, "save_percent=100")["verdict"] == "not comparable"


def test_verdicts_are_always_one_of_three_and_numbers_finite():
    seeds = cases("seeds")
    recs = [rec(c, H100, tps=1234.0, peak=7.0) for c in seeds.values()] + _stack_records()
    cf = claims_frame(to_frame(recs))
    assert set(cf["verdict"]) <= VERDICTS and len(cf) == len(CLAIMS)
    for v in cf["measured"].dropna():
        assert isinstance(v, (int, float)) and math.isfinite(v)
    assert (cf["why"].str.len() > 0).all()
    # feature claims never claim a verdict beyond "not comparable"
    assert set(cf[[c.kind == "feature" for c in CLAIMS]]["verdict"]) == {"not comparable"}


# ------------------------------------------------------------------------------------------------ suites
def test_seeds_suite_runs_every_seed_preset():
    cs = load("seeds", device="cuda")
    presets = {c.model.name.split("+")[0] for c in cs}
    assert presets == {"moeforge-small", "moeforge-medium", "optimal-moe-lm", "switch-base", "switch-large",
                       "momoe-layer", "moe-transformer"}
    assert len(cs) <= 14   # one or two workloads per seed: a few minutes on one GPU
    mf = [c for c in cs if c.model.name.startswith("moeforge")]
    assert all((c.workload.batch, c.workload.seq, c.model.norm) == (8, 512, "liger") for c in mf)


def test_l4_full_stack_comparison():
    cs = load("l4", device="cuda")
    assert all(c.memory_budget_gib == 24 for c in cs)
    naive = [c for c in cs if c.model.name.endswith("+naive-stack")]
    opt = [c for c in cs if "+opt-" in c.model.name]
    assert {c.model.name for c in naive} == {"moeforge-small+naive-stack", "moeforge-medium+naive-stack"}
    assert all((c.backend, c.model.attention, c.model.norm) == ("naive", "math", "torch") for c in naive)
    assert opt and all(c.backend != "naive" and c.model.attention in ("sdpa-flash", "sdpa-cudnn")
                       and c.model.norm in ("liger", "triton") for c in opt)
    assert {c.model.name.split("+")[0] for c in opt} == {"moeforge-small", "moeforge-medium"}
    # the per-backend matrix stays
    plain = {(c.model.name, c.backend) for c in cs if "+" not in c.model.name}
    assert ("moeforge-medium", "grouped_mm") in plain and ("moeforge-small", "naive") in plain


def test_scaling_suite_axes():
    cs = load("scaling", device="cuda")
    assert all(c.workload.level == "layer" and c.workload.dtype == "bfloat16" and c.workload.mode == "train"
               for c in cs)
    tokens = {c.workload.tokens for c in cs}
    assert min(tokens) == 1024 and max(tokens) == 65536
    assert {c.model.n_experts for c in cs} >= {8, 256} and {c.model.top_k for c in cs} >= {1, 8}
    assert {c.model.d_expert for c in cs} >= {256, 4096}
    # the experts axis holds active FLOPs fixed
    e_axis = [c for c in cs if c.model.top_k == 4 and c.model.d_expert == 512]
    assert len({c.model.n_experts for c in e_axis}) >= 4
    assert len({c.model.layer_flops_per_token() for c in e_axis}) == 1
    # naive only at the small end
    assert all(c.workload.tokens <= 4096 for c in cs if c.backend == "naive")
    assert len(cs) <= 45  # 43 ran in 112 s on the H100 (results/h100/scaling.jsonl)


def test_h100_suite_has_issue_8_shapes():
    cs = load("h100", device="cuda")
    shapes = {(c.workload.tokens, c.model.d_model, c.model.d_expert, c.model.n_experts, c.model.top_k)
              for c in cs}
    assert shapes == {(24576, 1536, 256, 128, 8), (24576, 1536, 512, 64, 4), (24576, 1536, 1024, 32, 2),
                      (16384, 2048, 1024, 64, 8), (16384, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6),
                      (4096, 512, 1365, 4, 2)}
    assert {c.workload.mode for c in cs} == {"train", "forward"}
    assert {c.workload.routing for c in cs} == {"uniform", "zipf:1.2"}
    assert {"naive", "shuffle", "grouped_mm"} <= {c.backend for c in cs}


# ------------------------------------------------------------------------------------ execution modes
def _in_mode(case: Case, exec_: str) -> Case:
    return case.model_copy(update={"workload": case.workload.model_copy(update={"exec": exec_})})


def _timed(case, tps, halfwidth, noisy=None, status="ok", reason=""):
    r = rec(case, H100, status=status, tps=tps if status == "ok" else None, peak=5.0 if status == "ok" else None,
            reason=reason)
    if status == "ok":
        r["metrics"]["precision"] = {"target": 0.01, "reached": noisy is None, "halfwidth": halfwidth,
                                     "ci95_ms": [1.0, 1.1]}
        r["metrics"]["noisy"] = noisy
    return r


def test_a_claim_measured_in_two_exec_modes_gets_a_row_per_mode_with_its_precision():
    l4 = cases("l4")
    naive = l4["moeforge-medium+naive-stack|naive"]
    opt = next(c for k, c in l4.items() if k.startswith("moeforge-medium+opt-"))
    recs = [_timed(naive, 1000.0, 0.2, noisy="spread 24.0% > 10%"), _timed(opt, 2500.0, 0.07),
            _timed(_in_mode(naive, "graphs"), None, None, status="skipped",
                   reason="naive syncs with the host: a CUDA graph cannot capture its step"),
            _timed(_in_mode(opt, "graphs"), 6000.0, 0.001)]
    cf = claims_frame(to_frame(recs))
    rows = cf[cf["claim"].str.contains("66% faster")]
    assert list(rows["exec"]) == ["eager", "graphs"]
    eager, graphs = rows.iloc[0], rows.iloc[1]
    assert eager["measured"] == 2.5 and eager["verdict"] == "reproduced"
    assert "±20.0%, noisy" in eager["precision"] and "±7.0%" in eager["precision"]
    assert "Timing noisy" in eager["why"] and "spread 24.0%" in eager["why"]
    # graphs: judged on graphs records only; the naive stack could not be captured, and the row says so
    assert graphs["verdict"] == "not comparable" and "cannot capture" in graphs["why"]
    assert pd.isna(graphs["measured"]) and graphs["precision"] == ""
    # memory: a row per mode as well, a single value, not a timing interval
    mem = cf[cf["claim"].str.contains("47% less memory")]
    assert list(mem["exec"]) == ["eager", "graphs"] and mem.iloc[0]["precision"] == "single values (peak memory)"


def test_one_exec_mode_gives_one_row_naming_it():
    small = cases("seeds")["moeforge-small+moeforge-stack|shuffle"]
    cf = claims_frame(to_frame([_timed(small, 52805.0, 0.004)]))
    row = by_claim(cf, "Small: 52,805 TPS")
    assert row["exec"] == "eager" and row["precision"] == "±0.4% (±: 95% CI of the median)"
    assert by_claim(cf, "Medium: 644M")["exec"] == "any (no timing)"
