"""moebench.phases: kernel names -> step phases, per backend, on CONSTRUCTED kernel lists (tests/data/kernels.py:
real kernel names, made-up times; no GPU profile is recorded in results/)."""
import importlib.util
from pathlib import Path

import pytest

from moebench import phases

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kernels_fixture", HERE / "data" / "kernels.py")
kx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kx)


def _one(name, backend, **kw):
    """The {phase: share} the rules give one kernel name."""
    for rx, split in phases.rules(backend, **kw):
        if rx.search(name):
            return split
    return {"other kernels": 1.0}


@pytest.mark.parametrize("entries, backend, kw", [
    (kx.GROUPED_MM_TRAIN, "grouped_mm", {}),
    (kx.TRITON_TRAIN, "triton", {"options": {"recompute": 100}}),
    (kx.NAIVE_TRAIN, "naive", {}),
    (kx.MODEL_TRAIN, "grouped_mm", {"level": "model"}),
])
def test_every_constructed_kernel_lands_in_its_phase(entries, backend, kw):
    for name, _ms, _calls, phase in entries:
        want = {phase: 1.0} if isinstance(phase, str) else phase
        got = _one(name, backend, **kw)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(v) for k, v in want.items()), name


@pytest.mark.parametrize("entries, backend, kw", [
    (kx.GROUPED_MM_TRAIN, "grouped_mm", {}),
    (kx.TRITON_TRAIN, "triton", {"options": {"recompute": 100}}),
    (kx.NAIVE_TRAIN, "naive", {}),
])
def test_step_phases_add_up_to_the_step_with_idle_gaps(entries, backend, kw):
    prof = kx.profile(entries)
    busy = sum(ms for _, ms, _, _ in entries) / kx.STEPS
    got = phases.step_phases(prof, busy + 2.5, backend=backend, **kw)
    assert list(got) == list(phases.PHASES)
    assert got["idle gaps"] == pytest.approx(2.5)
    assert sum(got.values()) == pytest.approx(busy + 2.5)
    for p, v in kx.expected_ms(entries).items():
        assert got[p] == pytest.approx(v), p


def test_kernels_longer_than_the_step_give_no_negative_gap():
    prof = kx.profile(kx.GROUPED_MM_TRAIN)
    busy = sum(ms for _, ms, _, _ in kx.GROUPED_MM_TRAIN) / kx.STEPS
    assert phases.step_phases(prof, busy * 0.9, backend="grouped_mm")["idle gaps"] == 0.0


def test_rows_gemm_split_follows_recompute_and_mode():
    assert _one("rows_gemm_kernel", "triton", options={"recompute": 100}) == {"expert GEMMs fwd": 0.25, "dX": 0.75}
    rc0 = _one("rows_gemm_tma_kernel", "triton", options={"recompute": 0})
    assert rc0["expert GEMMs fwd"] == pytest.approx(1 / 3) and rc0["dX"] == pytest.approx(2 / 3)
    assert _one("rows_gemm_kernel", "triton", mode="forward") == {"expert GEMMs fwd": 1.0}
    assert _one("bwd_act_kernel", "triton+shared", options={"recompute": 0}) == {"dX": 1.0}
    # a forward-only grouped GEMM is all forward
    assert _one(kx.CUTLASS_GROUPED, "grouped_mm", mode="forward") == {"expert GEMMs fwd": 1.0}


def test_fp32_gemms_are_the_router_only_in_a_bf16_case():
    assert _one(kx.ROUTER_GEMM, "naive", dtype="bfloat16") == {"router/top-k": 1.0}
    assert _one(kx.ROUTER_GEMM, "naive", dtype="float32") == kx.THIRDS


def test_model_level_dense_gemms_depend_on_whether_the_backend_has_expert_kernels():
    assert _one(kx.NVJET, "grouped_mm", level="model") == {"other layers": 1.0}
    assert _one(kx.NVJET, "shuffle", level="model") == {"dense GEMMs (experts + other layers)": 1.0}


def test_unmatched_names_are_listed_not_guessed():
    prof = kx.profile(kx.GROUPED_MM_TRAIN)
    assert sorted(phases.unmatched(prof, backend="grouped_mm")) == sorted([kx.MUL, kx.MEMCPY])


def test_bad_profiles_and_options_name_what_is_wrong():
    with pytest.raises(ValueError, match="'steps' must be a positive number"):
        phases.step_phases({"steps": 0, "kernels": []}, 1.0, backend="triton")
    with pytest.raises(ValueError, match="no 'kernels' list"):
        phases.step_phases({"steps": 3}, 1.0, backend="triton")
    with pytest.raises(ValueError, match="needs 'name' and 'ms'"):
        phases.step_phases({"steps": 3, "kernels": [{"name": "x"}]}, 1.0, backend="triton")
    with pytest.raises(ValueError, match="mode 'backward' is not one of: train, forward"):
        phases.rules("triton", mode="backward")
    with pytest.raises(ValueError, match="level 'train-run'.*valid: layer, model"):
        phases.rules("triton", level="train-run")
