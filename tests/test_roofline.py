"""moebench.roofline: the FLOP and minimum-byte model on small cases computed by hand, and its agreement with
ModelSpec's FLOP count."""
import pytest

from moebench import roofline
from moebench.spec import preset


def test_forward_of_a_tiny_layer_by_hand():
    # T=4 tokens, D=2, F=3, E=2 experts, K=1, bf16 (2 bytes): S = 4 slots, both experts can get tokens
    m = roofline.layer_model(4, 2, 3, 2, 1, train=False, dtype="bfloat16")
    assert [p.name for p in m.parts] == ["router", "permutation", "expert GEMMs fwd"]
    # router: 2*T*D*E = 2*4*2*2 = 32 FLOPs; x 4*2*2 = 16 B + w_router 2*2*2 = 8 B + routing 4*(4+4) = 32 B
    assert (m.part("router").flops, m.part("router").bytes) == (32, 56)
    # permutation: no FLOPs; 4 indices read + 4 positions written, 4 B each = 32 B
    assert (m.part("permutation").flops, m.part("permutation").bytes) == (0, 32)
    # experts: 6*S*D*F = 6*4*2*3 = 144 FLOPs; weights 3*2*2*3*2 = 72 B + gate weights 4*4 = 16 B + y 4*2*2 = 16 B
    assert (m.part("expert GEMMs fwd").flops, m.part("expert GEMMs fwd").bytes) == (144, 104)
    assert (m.flops, m.bytes) == (176, 192)
    assert m.intensity == pytest.approx(176 / 192)


def test_training_step_by_hand_with_a_shared_expert_in_float32():
    # T=2, D=4, F=2, E=8, K=1, one shared expert of hidden 3, fp32 (4 bytes): S = 2, so only E' = 2 experts
    # can receive a token and only their weights count
    m = roofline.layer_model(2, 4, 2, 8, 1, shared_hidden=3, train=True, dtype="float32")
    w = 3 * 2 * 4 * 2 * 4          # 3 * E' * D * F * b = 192 B of expert weights
    ws = 3 * 4 * 3 * 4             # 3 * D * Fs * b = 144 B of shared weights
    xb = 2 * 4 * 4                 # one T x D tensor: 32 B
    fwd_flops = 6 * 2 * 4 * 2 + 6 * 2 * 4 * 3       # routed 96 + shared 144
    assert m.part("router").flops == 2 * 2 * 4 * 8 == 128
    assert m.part("router").bytes == xb + 4 * 8 * 4 + 2 * 8 == 176
    assert m.part("expert GEMMs fwd").flops == fwd_flops == 240
    assert m.part("expert GEMMs fwd").bytes == w + 2 * 4 + xb + ws == 376
    assert m.part("router bwd").flops == 256 and m.part("router bwd").bytes == 2 * 4 * 8 * 4
    assert m.part("expert GEMMs dX").flops == 240 and m.part("expert GEMMs dX").bytes == xb + w + xb + ws
    assert m.part("expert GEMMs dW").flops == 240 and m.part("expert GEMMs dW").bytes == xb + w + ws
    assert m.flops == 128 + 240 * 3 + 256


def test_expert_flops_match_the_spec_count_and_the_router_is_extra():
    spec = preset("olmoe-layer")
    T = 16384
    case = {"model": spec.model_dump(mode="json"),
            "workload": {"level": "layer", "mode": "train", "batch": 1, "seq": T, "dtype": "bfloat16"}}
    m = roofline.of_case(case)
    experts = sum(p.flops for p in m.parts if p.name.startswith("expert GEMMs"))
    assert experts == pytest.approx(spec.layer_flops_per_token() * 3 * T)
    router = sum(p.flops for p in m.parts if p.name.startswith("router"))
    assert router == pytest.approx(6 * T * spec.d_model * spec.n_experts)


def test_intensity_grows_with_tokens_and_the_roof_bends_at_the_ridge():
    small = roofline.layer_model(256, 2048, 1024, 64, 8, dtype="bfloat16")
    big = roofline.layer_model(65536, 2048, 1024, 64, 8, dtype="bfloat16")
    assert big.intensity > 10 * small.intensity   # weights are read once whatever T: more tokens reuse them
    ridge = 800.0 / 4000.0 * 1e3                  # 800 TFLOP/s over 4000 GB/s: 200 FLOP/B
    assert roofline.attainable_tflops(ridge / 2, 800.0, 4000.0) == pytest.approx(400.0)
    assert roofline.attainable_tflops(ridge * 2, 800.0, 4000.0) == 800.0


def test_only_layer_cases_are_modelled_and_bad_sizes_are_named():
    spec = preset("olmoe-layer").model_dump(mode="json")
    assert roofline.of_case({"model": spec, "workload": {"level": "model", "mode": "train", "batch": 8,
                                                         "seq": 512, "dtype": "bfloat16"}}) is None
    with pytest.raises(ValueError, match="dtype 'int8'.*valid: bfloat16"):
        roofline.layer_model(4, 2, 3, 2, 1, dtype="int8")
    with pytest.raises(ValueError, match="K=0"):
        roofline.layer_model(4, 2, 3, 2, 0)
    with pytest.raises(KeyError, match="no part 'attention'"):
        roofline.layer_model(4, 2, 3, 2, 1).part("attention")
