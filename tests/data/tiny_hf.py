"""Tiny random-weight Hugging Face transformers MoE models for the trace tests, and the committed example
trace.

    python tests/data/tiny_hf.py suites/traces/tiny-olmoe-e6k2.npz   # regenerate the example trace

tiny_model() saves a model built from a tiny config (seeded random weights) with a byte-level tokenizer (256
tokens, one per byte, no merges) to a directory, so `moebench trace` loads both by path with nothing
downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE / "trace_text.txt"  # the example trace's text


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_config(kind: str, E: int, K: int, layers: int):
    import transformers

    common = {"vocab_size": 256, "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "num_experts_per_tok": K,
              "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1}
    if kind == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=E)
    if kind == "qwen2_moe":  # a gated shared expert and a dense layer (mlp_only_layers) beside the MoE ones
        return transformers.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                           num_experts=E, shared_expert_intermediate_size=24,
                                           mlp_only_layers=[0])
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=E)
    if kind == "llama":  # dense: no MoE layers
        return transformers.LlamaConfig(**{k: v for k, v in common.items() if k != "num_experts_per_tok"},
                                        intermediate_size=48)
    raise ValueError(kind)


def tiny_model(path: Path, kind: str = "olmoe", E: int = 6, K: int = 2, layers: int = 2,
               seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind, E, K, layers))
    with torch.no_grad():  # weights large enough that the router's choices depend on the input
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return Path(path)


if __name__ == "__main__":
    import os
    import tempfile

    from moebench import record

    out = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)  # the trace's meta names the model as given: "tiny-olmoe-e6k2-seed0", not a temp path
        t = record.record(tiny_model(Path("tiny-olmoe-e6k2-seed0")), TEXT, out, tokens=512, seq=256)
    print(out, t.shape, {k: v for k, v in t.meta.items() if k != "layers"})
