"""Current open MoE models as plain data: the ModelSpec fields their published configurations give, the
parameter counts their makers publish, and what ModelSpec cannot express. spec.py turns each entry into two
presets: `<name>` (the whole model) and `<name>-layer` (its MoE layer alone, as spec._layer: n_heads 1; D, F,
E, K, the shared experts and the router kept). This module imports nothing from moebench, so spec.py imports
it without a cycle.

Fields are from each model's Hugging Face config.json (the transformers config class named beside it reads the
same keys): hidden_size -> d_model, moe_intermediate_size or intermediate_size -> d_expert, num_local_experts
or num_experts or n_routed_experts -> n_experts, num_experts_per_tok -> top_k, num_hidden_layers -> n_layers,
num_attention_heads / num_key_value_heads / head_dim -> n_heads / n_kv_heads / d_head, vocab_size,
max_position_embeddings -> max_seq_len, tie_word_embeddings, rms_norm_eps, rope_theta. Router fields follow
the model's routing code (scoring, renormalisation, groups, scale). Balance losses are training choices and
are left at none (a suite sets them), except DeepSeek-V3, whose expert selection itself adds the loss-free
bias. tests/test_models.py prints every count beside the published one and holds each to it (2%) or pins the
gap.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpenModel:
    spec: dict              # ModelSpec fields (name is added from the key)
    total: float            # published total parameters
    active: float           # published active parameters per token
    published: str          # where those two figures are published
    not_modelled: str       # what ModelSpec cannot express, and what it does to the count


B = 1e9

MODELS: dict[str, OpenModel] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json (MixtralConfig). Router: softmax, top-2 renormalised.
    "mixtral-8x7b": OpenModel(
        {"vocab_size": 32000, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
         "max_seq_len": 32768, "n_experts": 8, "top_k": 2, "d_expert": 14336, "tie_embeddings": False,
         "norm_eps": 1e-5, "rope_theta": 1e6},
        46.7 * B, 12.9 * B, "mistral.ai/news/mixtral-of-experts: 46.7B total, 12.9B used per token",
        "nothing that changes the count (sliding_window is null in this config)"),
    # mistralai/Mixtral-8x22B-v0.1 config.json (MixtralConfig): vocab_size 32768 (an earlier community
    # conversion says 32000: 9.4M parameters apart, 0.007%).
    "mixtral-8x22b": OpenModel(
        {"vocab_size": 32768, "d_model": 6144, "n_layers": 56, "n_heads": 48, "n_kv_heads": 8,
         "max_seq_len": 65536, "n_experts": 8, "top_k": 2, "d_expert": 16384, "tie_embeddings": False,
         "norm_eps": 1e-5, "rope_theta": 1e6},
        141 * B, 39 * B, "mistral.ai/news/mixtral-8x22b: 39B active parameters out of 141B",
        "nothing that changes the count"),
    # Qwen/Qwen3-30B-A3B config.json (Qwen3MoeConfig): head_dim 128 (q is 32 x 128 = 4096 wide, not D),
    # experts every layer (decoder_sparse_step 1, mlp_only_layers []), norm_topk_prob true.
    "qwen3-30b-a3b": OpenModel(
        {"vocab_size": 151936, "d_model": 2048, "n_layers": 48, "n_heads": 32, "n_kv_heads": 4, "d_head": 128,
         "max_seq_len": 40960, "n_experts": 128, "top_k": 8, "d_expert": 768, "tie_embeddings": False,
         "norm_eps": 1e-6, "rope_theta": 1e6},
        30.5 * B, 3.3 * B, "huggingface.co/Qwen/Qwen3-30B-A3B model card: 30.5B in total and 3.3B activated",
        "per-head q/k RMSNorm (2 x 128 weights a layer)"),
    # Qwen/Qwen3-235B-A22B config.json (Qwen3MoeConfig).
    "qwen3-235b-a22b": OpenModel(
        {"vocab_size": 151936, "d_model": 4096, "n_layers": 94, "n_heads": 64, "n_kv_heads": 4, "d_head": 128,
         "max_seq_len": 40960, "n_experts": 128, "top_k": 8, "d_expert": 1536, "tie_embeddings": False,
         "norm_eps": 1e-6, "rope_theta": 1e6},
        235 * B, 22 * B, "huggingface.co/Qwen/Qwen3-235B-A22B model card: 235B in total and 22B activated",
        "per-head q/k RMSNorm (2 x 128 weights a layer)"),
    # deepseek-ai/DeepSeek-V3 config.json (DeepseekV3Config): first_k_dense_replace 3 with intermediate_size
    # 18432, n_shared_experts 1, scoring_func sigmoid, n_group 8, topk_group 4, routed_scaling_factor 2.5,
    # norm_topk_prob true, topk_method noaux_tc (selection on s + e_score_correction_bias; loss-free bias
    # balancing, update speed 0.001 in the DeepSeek-V3 report). Attention is MLA (q_lora_rank 1536,
    # kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, 128 heads): here plain MHA
    # with 128 heads of D/128.
    "deepseek-v3": OpenModel(
        {"vocab_size": 129280, "d_model": 7168, "n_layers": 61, "n_heads": 128, "max_seq_len": 163840,
         "n_experts": 256, "top_k": 8, "d_expert": 2048, "n_shared_experts": 1, "first_dense_layers": 3,
         "d_dense": 18432, "tie_embeddings": False, "norm_eps": 1e-6, "rope_theta": 10000.0,
         "router": {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "route_scale": 2.5,
                    "balance": "bias", "bias_rate": 1e-3}},
        671 * B, 37 * B, "huggingface.co/deepseek-ai/DeepSeek-V3 model card: 671B total, 37B activated for "
        "each token (685B on the hub = 671B main model + 14B multi-token-prediction module)",
        "MLA attention (MHA stands in: 205.5M a layer instead of MLA's 187.1M), the MTP module (14B, not in "
        "the 671B either), the e_score_correction_bias values (in the checkpoint; router.score_bias takes "
        "them)"),
    # deepseek-ai/DeepSeek-V2-Lite config.json (DeepseekV2Config): first_k_dense_replace 1 with
    # intermediate_size 10944, n_shared_experts 2, softmax scoring, norm_topk_prob false,
    # routed_scaling_factor 1.0, no group limit (topk_method greedy). MLA: q_lora_rank null, kv_lora_rank 512,
    # qk_nope 128, qk_rope 64, v_head 128, 16 heads.
    "deepseek-v2-lite": OpenModel(
        {"vocab_size": 102400, "d_model": 2048, "n_layers": 27, "n_heads": 16, "max_seq_len": 163840,
         "n_experts": 64, "top_k": 6, "d_expert": 1408, "n_shared_experts": 2, "first_dense_layers": 1,
         "d_dense": 10944, "tie_embeddings": False, "norm_eps": 1e-6, "rope_theta": 10000.0,
         "router": {"norm_topk": False}},
        15.7 * B, 2.4 * B, "huggingface.co/deepseek-ai/DeepSeek-V2-Lite model card: 15.7B parameters, 2.4B "
        "activated for each token",
        "MLA attention (MHA stands in: 16.8M a layer instead of MLA's 13.8M)"),
    # allenai/OLMoE-1B-7B-0924 config.json (OlmoeConfig): norm_topk_prob false.
    "olmoe-1b-7b": OpenModel(
        {"vocab_size": 50304, "d_model": 2048, "n_layers": 16, "n_heads": 16, "max_seq_len": 4096,
         "n_experts": 64, "top_k": 8, "d_expert": 1024, "tie_embeddings": False, "norm_eps": 1e-5,
         "rope_theta": 10000.0, "router": {"norm_topk": False}},
        6.9 * B, 1.3 * B, "OLMoE paper (arXiv 2409.02060): 6.9B total parameters, 1.3B active per input "
        "token",
        "q/k RMSNorm over the full width (2 x 2048 weights a layer)"),
    # openai/gpt-oss-20b config.json (GptOssConfig): head_dim 64 (q 64 x 64 = 4096 wide), experts_per_token 4.
    # Router: softmax over the top-k logits (the same weights as softmax then renormalised over the top k).
    "gpt-oss-20b": OpenModel(
        {"vocab_size": 201088, "d_model": 2880, "n_layers": 24, "n_heads": 64, "n_kv_heads": 8, "d_head": 64,
         "max_seq_len": 131072, "n_experts": 32, "top_k": 4, "d_expert": 2880, "tie_embeddings": False,
         "norm_eps": 1e-5, "rope_theta": 150000.0},
        20.91 * B, 3.61 * B, "gpt-oss model card (arXiv 2508.10925), table 1: 20.91B total, 3.61B active",
        "biases (q/k/v/o, router, experts: 6.6M in all), attention sinks, the 128-token sliding window on "
        "every other layer, the clamped SwiGLU (limit 7, alpha 1.702), YaRN; the published active count "
        "leaves out the embedding table (0.58B), ours counts it"),
    # openai/gpt-oss-120b config.json (GptOssConfig).
    "gpt-oss-120b": OpenModel(
        {"vocab_size": 201088, "d_model": 2880, "n_layers": 36, "n_heads": 64, "n_kv_heads": 8, "d_head": 64,
         "max_seq_len": 131072, "n_experts": 128, "top_k": 4, "d_expert": 2880, "tie_embeddings": False,
         "norm_eps": 1e-5, "rope_theta": 150000.0},
        116.83 * B, 5.13 * B, "gpt-oss model card (arXiv 2508.10925), table 1: 116.83B total, 5.13B active",
        "as gpt-oss-20b (biases: 39.5M in all); the published active count leaves out the embedding table "
        "(0.58B)"),
    # meta-llama/Llama-4-Scout-17B-16E config.json text_config (Llama4TextConfig): intermediate_size 8192
    # (experts and the shared expert), interleave_moe_layer_step 1 (every layer MoE), router sigmoid on the
    # top-1 logit.
    "llama4-scout": OpenModel(
        {"vocab_size": 202048, "d_model": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8,
         "max_seq_len": 10485760, "n_experts": 16, "top_k": 1, "d_expert": 8192, "n_shared_experts": 1,
         "tie_embeddings": False, "norm_eps": 1e-5, "rope_theta": 500000.0,
         "router": {"scoring": "sigmoid", "norm_topk": False}},
        109 * B, 17 * B, "huggingface.co/meta-llama/Llama-4-Scout-17B-16E model card: 17B activated, 109B "
        "total",
        "the vision encoder and projector (in the published 109B), the router weight applied to the expert's "
        "input rather than its output, NoPE on every 4th layer, chunked attention (8192), L2 q/k norm"),
    # microsoft/Phi-3.5-MoE-instruct config.json (PhimoeConfig).
    "phi3.5-moe": OpenModel(
        {"vocab_size": 32064, "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
         "max_seq_len": 131072, "n_experts": 16, "top_k": 2, "d_expert": 6400, "tie_embeddings": False,
         "norm_eps": 1e-5, "rope_theta": 10000.0},
        42 * B, 6.6 * B, "Phi-3 technical report (arXiv 2404.14219): phi-3.5-MoE, 42B total, 6.6B active "
        "parameters",
        "the sparsemixer router (ours: softmax top-2 renormalised), LayerNorm and attention / lm_head "
        "biases, input jitter 0.01, LongRoPE scaling"),
    # Qwen/Qwen1.5-MoE-A2.7B-Chat config.json (Qwen2MoeConfig; as its GPTQ-Int4 copy shows):
    # shared_expert_intermediate_size 5632 (one shared MLP), gated per token by shared_expert_gate =
    # Linear(D, 1) + sigmoid, norm_topk_prob false, max_position_embeddings 32768.
    "qwen1.5-moe-a2.7b": OpenModel(
        {"vocab_size": 151936, "d_model": 2048, "n_layers": 24, "n_heads": 16, "max_seq_len": 32768,
         "n_experts": 60, "top_k": 4, "d_expert": 1408, "n_shared_experts": 1, "d_shared": 5632,
         "shared_gate": True, "tie_embeddings": False, "norm_eps": 1e-6, "rope_theta": 1e6,
         "router": {"norm_topk": False}},
        14.3 * B, 2.7 * B, "huggingface.co/Qwen/Qwen1.5-MoE-A2.7B model card: 14.3B parameters in total and "
        "2.7B activated",
        "q/k/v biases (3 x 2048 a layer)"),
}
