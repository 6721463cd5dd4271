"""The gemm_dtype axis on CPU: the workload field (validated, in the key only when not default, in the label, the
record and the results frame), backends declaring the gemm dtypes they have (others `skipped` with the reason,
never run in bf16 under the fp8 name), grouped_mm's fp8 case skipped on CPU with the reason, and the fp8 parity gate:
grouped_mm's fp8 glue with torch._scaled_grouped_mm emulated on CPU (same contract: e4m3 row-major a, column-major
b, fp32 dequant scales, bf16 out) passes against the fp8 reference, and a backend that claims fp8 but skips the
quantisation is a `mismatch`. The fp8 GEMMs themselves run in tests/gpu/test_gpu_fp8.py.

Legend: S slots, K reduced dim, N output columns, E experts, T tokens.
"""
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from implementations import fp8_grouped
from implementations import grouped_mm as gmm
from moebench import envinfo, harness, registry, results
from moebench.registry import Backend
from moebench.spec import Case, Workload, preset
from moebench.suite import SuiteError, load


def emulated_scaled_grouped_mm(qa_SK, qb_EKN, sa_S, sb_EN, *, offs, out_dtype, use_fast_accum):
    """torch._scaled_grouped_mm's contract on CPU: out = (qa * sa[:, None]) @ (qb * sb[:, None, :]) per group, fp32
    accumulation, out_dtype out. Checks the layouts the CUDA kernel demands."""
    assert qa_SK.dtype == qb_EKN.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16
    assert qa_SK.stride(-1) == 1 and qb_EKN.stride(-2) == 1, "a row-major, b column-major"
    assert sa_S.shape == qa_SK.shape[:1] and sb_EN.shape == (qb_EKN.shape[0], qb_EKN.shape[2])
    assert qa_SK.shape[1] % 16 == 0 and qb_EKN.shape[2] % 16 == 0
    a = qa_SK.float() * sa_S[:, None]
    b = qb_EKN.float() * sb_EN[:, None, :]
    return torch._grouped_mm(a, b, offs=offs).to(out_dtype)


@pytest.fixture(scope="module")
def env():
    return envinfo.collect("cpu")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(fp8_grouped, "scaled_op", lambda: emulated_scaled_grouped_mm)


def fp8_case(backend="grouped_mm", gemm="fp8-rowwise", **wl) -> Case:
    w = dict(level="layer", mode="train", batch=2, seq=24, dtype="bfloat16", warmup=1, repeats=3,
             gemm_dtype=gemm) | wl
    return Case(model=preset("tiny-layer"), backend=backend, workload=Workload(**w), max_time_s=0.3)


@pytest.fixture
def test_backend():
    names = []

    def make(name, forward, gemm_dtypes=("default", "fp8-rowwise")):
        registry.register(Backend(name=name, forward=forward, description="test", gemm_dtypes=gemm_dtypes))
        names.append(name)
        return name
    yield make
    for n in names:
        registry.unregister(n)


# ------------------------------------------------------------------------------------------------ the workload field
def test_gemm_dtype_default_stays_out_of_the_key_and_fp8_changes_it():
    plain = Case(model=preset("tiny-layer"), backend="grouped_mm", workload=Workload(seq=24, dtype="bfloat16"))
    same = Case(model=preset("tiny-layer"), backend="grouped_mm",
                workload=Workload(seq=24, dtype="bfloat16", gemm_dtype="default"))
    fp8 = fp8_case(warmup=3, repeats=10, batch=1)
    assert plain.key == same.key and fp8.key != plain.key
    assert "gemm=fp8-rowwise" in fp8.label and "gemm=" not in plain.label


def test_committed_records_keep_their_keys():
    """Records written before gemm_dtype existed: their case rebuilt today has the key they were stored under."""
    files = sorted((Path(__file__).resolve().parent.parent / "results").rglob("*.jsonl"))
    recs = [json.loads(f.read_text().splitlines()[0]) for f in files]
    assert [r for r in recs if "gemm_dtype" not in r["case"]["workload"]]  # some predate the field
    for r in recs:
        assert Case.model_validate(r["case"]).key == r["case_key"]


def test_fp8_takes_bf16_workloads_only():
    with pytest.raises(ValidationError, match="gemm_dtype 'fp8-rowwise'.*takes dtype = 'bfloat16', not 'float32'"):
        Workload(seq=8, dtype="float32", gemm_dtype="fp8-rowwise")


def test_a_bad_gemm_dtype_in_a_suite_names_file_key_and_choices(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[matrix]]\nmodels = [{ preset = 'tiny-layer' }]\n[[matrix.workloads]]\nseq = 8\n"
                    "dtype = 'bfloat16'\ngemm_dtype = 'fp8'\n")
    with pytest.raises(SuiteError) as e:
        load(str(path))
    msg = str(e.value)
    for part in (str(path), "matrix[0].workloads[0].gemm_dtype", "'default'", "'fp8-rowwise'", "'fp8'"):
        assert part in msg, msg


def test_fp8_suite_expands_bf16_and_fp8_cases():
    cases = load("fp8", device="cuda")
    gemm = {(c.backend, c.workload.gemm_dtype) for c in cases}
    assert {("grouped_mm", "default"), ("grouped_mm", "fp8-rowwise"), ("torchao_fp8", "fp8-rowwise-fp8bwd")} <= gemm
    for c in cases:  # every case asks its backend for a gemm dtype it declares (triton: skipped, with the reason)
        assert c.workload.gemm_dtype in registry.get(c.backend).gemm_dtypes or c.backend == "triton"
    assert {c.workload.exec for c in cases if c.workload.level == "layer"} == {"eager", "graphs"}
    assert {c.model.name for c in cases} >= {"mixtral-layer", "olmoe-layer"}
    train = [c for c in cases if c.workload.level == "train-run"]
    assert {c.workload.gemm_dtype for c in train} == {"default", "fp8-rowwise"}
    assert len({(c.workload.seed, c.workload.train) for c in train}) == 1  # same seed and data, bf16 vs fp8


# ------------------------------------------------------------------------------------------------ skip, never fall back
def test_grouped_mm_fp8_on_cpu_is_skipped_with_the_reason(env):
    rec = harness.run_case(fp8_case(), "t", env)
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"] and "_scaled_grouped_mm" in rec["reason"]
    assert rec["case"]["workload"]["gemm_dtype"] == "fp8-rowwise"
    assert "step_ms" not in rec["metrics"]


def test_a_backend_without_an_fp8_path_is_skipped_not_run_in_bf16(env):
    rec = harness.run_case(fp8_case("naive"), "t", env)
    assert rec["status"] == "skipped"
    assert "naive has no fp8-rowwise expert-GEMM path" in rec["reason"] and "default" in rec["reason"]


def test_a_backend_declaring_an_unknown_gemm_dtype_cannot_register():
    with pytest.raises(ValueError, match="gemm_dtypes \\('fp8',\\) must be one or more of default, fp8-rowwise"):
        registry.register(Backend(name="_bad_gemm", forward=gmm.forward, description="test", gemm_dtypes=("fp8",)))
    assert "_bad_gemm" not in registry.all_backends()


def test_forward_gets_gemm_dtype_only_when_not_default():
    b = registry.get("grouped_mm")
    assert b.call_options({}, "fp8-rowwise") == {"gemm_dtype": "fp8-rowwise"}
    assert "gemm_dtype" not in registry.get("triton").call_options({}, "default")
    assert "fp8" in b.path_taken("cuda", "bfloat16", "fp8-rowwise") and "fp8" not in b.path_taken("cpu", "float32")


def test_results_frame_has_the_gemm_dtype_axis(env):
    recs = [harness.run_case(fp8_case(), "t", env), harness.run_case(fp8_case(gemm="default"), "t", env)]
    old = json.loads(json.dumps(recs[1]))
    del old["case"]["workload"]["gemm_dtype"]  # a record from before the field: the default
    df = results.to_frame(recs + [old])
    assert list(df["gemm_dtype"]) == ["fp8-rowwise", "default", "default"]
    from rich.console import Console

    from moebench import console
    out = Console(width=250, record=True)
    out.print(console.summary_table(recs))
    text = out.export_text()
    assert "grouped_mm [fp8-rowwise]" in text and text.count("[fp8-rowwise]") == 1


# ------------------------------------------------------------------------------------------------ the fp8 parity gate
def test_grouped_mm_fp8_glue_passes_the_gate_against_the_reference(emulated, env, test_backend):
    """grouped_mm's fp8 path end to end on CPU, the scaled GEMM emulated: quantisation inside the step, padding
    (tiny-layer's D=48, F=36 are not multiples of 16), scales, layouts, the bf16 backward."""
    name = test_backend("_fp8_glue", gmm.forward)
    rec = harness.run_case(fp8_case(name), "t", env)
    assert rec["status"] == "ok", rec["reason"]
    par = rec["metrics"]["parity"]
    assert par["ok"] and par["detects_unquantised"] and par["gemm_dtype"] == "fp8-rowwise"
    assert all(par["errors"][k] <= par["tols"][k] for k in par["errors"])
    # the record says what fp8 costs: the end-to-end error vs the unquantised MoE, well above bf16's own error
    assert 0.02 < par["vs_naive"]["y"] < 0.2 and 0.02 < par["fp8_cost"]["y"] < 0.2
    assert par["tols"]["y"] < par["fp8_cost"]["y"]


def test_unquantised_backend_claiming_fp8_is_a_mismatch(env, test_backend):
    def bf16_only(x, idx, p, w1, w2, gemm_dtype="default"):
        return gmm.forward(x, idx, p, w1, w2)  # ignores gemm_dtype: bf16 GEMMs timed under the fp8 name
    rec = harness.run_case(fp8_case(test_backend("_fp8_impostor", bf16_only)), "t", env)
    assert rec["status"] == "mismatch" and "vs the fp8 reference" in rec["reason"], rec["reason"]
    assert "step_ms" not in rec["metrics"]
    par = rec["metrics"]["parity"]
    assert par["errors"]["y"] > par["tols"]["y"] and par["vs_naive"]["y"] < 0.02  # it is bf16, not fp8


def test_fp8_grouped_backward_is_the_bf16_grouped_gemm(emulated):
    """Fp8GroupedMM's gradients are torch._grouped_mm's on the unquantised operands (bf16, straight-through)."""
    g = torch.Generator().manual_seed(11)
    offs = torch.tensor([5, 5, 20, 32], dtype=torch.int32)  # an empty group too
    a = torch.randn(32, 48, generator=g).bfloat16().requires_grad_()
    b = (torch.randn(4, 48, 64, generator=g) / 7).bfloat16().requires_grad_()
    dy = torch.randn(32, 64, generator=g).bfloat16()
    fp8_grouped.grouped_mm_fp8(a, b, offs=offs).backward(dy)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch._grouped_mm(a2, b2, offs=offs).backward(dy)
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


def torchao_standin(A_SK, B_t_EKN, *, offs, out_dtype):
    """torchao's documented contract for its differentiable fp8 rowwise grouped GEMM, in plain torch: A row-major,
    B_t column-major with K and N multiples of 16, dynamic rowwise quantisation, e4m3 backward with per-group scales."""
    from moebench import quant
    assert A_SK.stride(-1) == 1 and B_t_EKN.stride(-2) == 1, "A row-major, B_t column-major (E, K, N)"
    assert A_SK.shape[-1] % 16 == 0 and B_t_EKN.shape[-1] % 16 == 0 and offs.dtype == torch.int32
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            outs.append(quant.fp8_matmul(A_SK[start:end], B_t_EKN[e], "fp8-rowwise-fp8bwd"))
        start = end
    return torch.cat(outs).to(out_dtype)


def test_torchao_glue_passes_the_fp8bwd_gate_with_a_standin(monkeypatch):
    """The torchao_fp8 adapter's glue (layout, gather, combine) through the fp8 parity gate with torchao's op stood in
    (torchao itself is not installed here: the real op runs in tests/gpu/test_gpu_fp8.py)."""
    from implementations.peers import torchao_fp8
    from moebench import core
    monkeypatch.setattr(torchao_fp8, "scaled_grouped_mm", lambda: ("standin", torchao_standin))
    c = Case(model=preset("tiny-layer", d_expert=32), backend="torchao_fp8",
             workload=Workload(seq=40, dtype="bfloat16", gemm_dtype="fp8-rowwise-fp8bwd"))
    assert registry.get("torchao_fp8").weight_layout == "linear"  # B_t arrives column-major, no copy
    par = core.parity(c)
    assert par["ok"], par
    assert par["detects_unquantised"] and 0.02 < par["vs_naive"]["dx"] < 0.2  # the gradients are quantised too
    # the reference models the e4m3 backward: the gradients sit far closer to it than to the unquantised ones
    assert all(par["errors"][k] < 0.6 * par["vs_naive"][k] for k in ("dx", "dw1", "dw2"))


def test_torchao_is_skipped_with_the_reason_here(env):
    c = fp8_case("torchao_fp8", gemm="fp8-rowwise-fp8bwd")
    rec = harness.run_case(c, "t", env)
    assert rec["status"] == "skipped" and ("torchao" in rec["reason"] or "CUDA" in rec["reason"] or "cuda" in rec["reason"])
    rec = harness.run_case(fp8_case("torchao_fp8"), "t", env)  # a gemm dtype it does not declare
    assert rec["status"] == "skipped"


def test_train_run_takes_the_gemm_dtype(emulated, test_backend):
    """train.run passes gemm_dtype to the backend (under bf16 autocast, fp32 master weights): the fp8 run (scaled GEMM
    emulated) follows the bf16 run closely without being it, with the same seed and data."""
    from moebench import train
    name = test_backend("_fp8_train", gmm.forward)
    curves = {}
    for gemm in ("default", "fp8-rowwise"):
        wl = Workload(level="train-run", batch=2, seq=32, dtype="bfloat16", gemm_dtype=gemm,
                      train={"steps": 6, "lr": 3e-3, "eval_batches": 1})
        curves[gemm] = train.run(Case(model=preset("tiny"), backend=name, workload=wl), "cpu")["loss_curve"]
    a, b = torch.tensor(curves["default"]), torch.tensor(curves["fp8-rowwise"])
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert a[0] == pytest.approx(b[0].item(), rel=0.02) and (a - b).abs().max() < 0.05 * a.abs().max()


def test_paired_rounds_put_fp8_beside_its_bf16_base():
    from moebench import paired
    gs = paired.groups(load("fp8", device="cuda"), "grouped_mm")
    mix = next(g for g in gs if g[0].model.name == "mixtral-layer" and g[0].workload.exec == "eager")
    assert mix[0].backend == "grouped_mm" and mix[0].workload.gemm_dtype == "default"
    assert ("grouped_mm", "fp8-rowwise") in {(c.backend, c.workload.gemm_dtype) for c in mix[1:]}


def test_an_fp8_gate_that_cannot_tell_an_unquantised_backend_apart_is_not_a_pass():
    """The gate passes only when its y tolerance is below what skipping the quantisation costs; otherwise an
    unquantised backend would pass too, and the case says the gate could not decide."""
    import importlib
    par_mod = importlib.import_module("moebench.core.parity")  # the module: moebench.core.parity is also a function

    case = fp8_case()

    def gate(own_y: float) -> dict:
        errs = {("got", "ref"): 0.01, ("rr", "ref"): own_y, ("ref", "unq"): 0.03, ("got", "unq"): 0.03}
        return par_mod._fp8_gate(case, lambda a, b: {"y": errs[(a, b)]}, "got", "unq", "ref", "rr")

    weak, strong = gate(0.02), gate(0.005)  # tolerances max(2e-2, 2 x own): 0.04 (>= cost 0.03) and 0.02
    assert not weak["ok"] and not weak["detects_unquantised"]
    assert "cannot decide" in par_mod.mismatch_reason(weak)
    assert strong["ok"] and strong["detects_unquantised"]
