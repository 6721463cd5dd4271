"""Record a routing trace from a Hugging Face transformers MoE model (`moebench trace`): forward hooks on its
router modules, the model run over a text file, the top-k choices written in moebench/traces.py's format.

Legend: T tokens, E experts, K top-k, D model dim, L MoE layers.
Routers are found by shape, not by class name: a submodule called `gate` or `router` whose weight is (E, D),
with E the config's expert count (num_local_experts | num_experts | n_routed_experts | moe_num_experts) and K
its top-k (num_experts_per_tok | experts_per_token | moe_topk). What a router returns is read as
  (..., weights (T, K) float, indices (T, K) integer): transformers >= 5 (Mixtral, Qwen2/3-MoE, OLMoE,
      DeepSeek-V3, gpt-oss, ...); the choices and the gate weights are recorded
  logits (T, E): a plain Linear gate (older releases) or Llama 4's router; the top K logits, no weights (the
      same set as the top K softmax or sigmoid scores; a router selecting on biased or group-limited scores
      returns its indices and is read by the first rule)
The model and tokenizer load with local_files_only=True: nothing is downloaded. Text is cut into sequences of
`seq` tokens, one forward pass each, until `tokens` tokens (or the text) are used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moebench import metrics, traces

E_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk")


class RecordError(ValueError):
    """Bad input for `moebench trace`: one sentence, exit code 2."""


def _config_int(cfg, keys) -> int | None:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for k in keys:
        v = getattr(text, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_routers(model, n_experts: int) -> list[tuple[str, object]]:
    """(name, module) of every router in model order: a `gate` or `router` submodule with an (E, D) weight."""
    found = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        named = name.rsplit(".", 1)[-1] in ("gate", "router")
        if named and getattr(w, "ndim", 0) == 2 and w.shape[0] == n_experts:
            found.append((name, mod))
    return found


def parse_router_output(out, T: int, E: int, K: int):
    """(idx_TK, p_TK or None) from what a router returned for T tokens (see the module docstring)."""
    import torch

    items = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o)]
    ints = [o for o in items if not o.is_floating_point() and o.numel() == T * K and o.shape[-1] == K]
    if ints:
        floats = [o for o in items if o.is_floating_point() and o.numel() == T * K and o.shape[-1] == K]
        p_TK = floats[-1].detach().reshape(T, K).float() if floats else None
        return ints[-1].detach().reshape(T, K), p_TK
    logits = [o for o in items if o.is_floating_point() and o.numel() == T * E and o.shape[-1] == E]
    if not logits:
        shapes = [tuple(o.shape) for o in items]
        raise RecordError(f"a router returned {shapes}: neither (T, K) indices nor (T, E) logits for T={T}, "
                          f"E={E}, K={K}")
    return logits[-1].detach().reshape(T, E).topk(K, dim=-1).indices, None


def record(model_path: Path, text_path: Path, out_path: Path, *, tokens: int = 4096, seq: int = 1024,
           tokenizer_path: Path | None = None, device: str = "cpu", dtype: str = "float32") -> traces.Trace:
    """Run the model over the text with hooks on its routers; write and return the trace."""
    model_path, text_path = Path(model_path), Path(text_path)
    if not model_path.exists():
        raise RecordError(f"model path {model_path} does not exist")
    if not text_path.is_file():
        raise RecordError(f"text file {text_path} does not exist")
    raw = text_path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise RecordError(f"text file {text_path} is empty: there is nothing to route")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one summary table, not loading bars
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True,
                                                                  dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecordError(f"cannot load a transformers model from {model_path}: {first}") from None
    E, K = _config_int(model.config, E_KEYS), _config_int(model.config, K_KEYS)
    routers = find_routers(model, E) if E and K else []
    if not routers:
        raise RecordError(f"{model_path} has no MoE layers: no expert count in its config or no "
                          f"`gate`/`router` module with an (experts, hidden) weight")
    tok_path = Path(tokenizer_path) if tokenizer_path else model_path
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise RecordError(f"no tokenizer at {tok_path} ({type(e).__name__}); give one with "
                          "--tokenizer") from None
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    if not ids:
        raise RecordError(f"text file {text_path} gives no tokens")
    got: dict[str, list] = {name: [] for name, _ in routers}

    def hook_for(name):
        def hook(mod, args, out):
            x = args[0]
            idx_TK, p_TK = parse_router_output(out, x.numel() // x.shape[-1], E, K)
            got[name].append((idx_TK.cpu(), None if p_TK is None else p_TK.cpu()))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in routers]
    model.to(device).eval()
    try:
        with torch.no_grad():
            for s in range(0, len(ids), seq):
                model(input_ids=torch.tensor([ids[s:s + seq]], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    idx_LTK = np.stack([torch.cat([i for i, _ in got[n]]).numpy() for n, _ in routers])
    weights = all(p is not None for n, _ in routers for _, p in got[n])
    p_LTK = np.stack([torch.cat([p for _, p in got[n]]).numpy() for n, _ in routers]) if weights else None
    from moebench import __version__
    meta = {"model": str(model_path), "model_type": getattr(model.config, "model_type", None), "n_experts": E,
            "top_k": K, "layers": [n for n, _ in routers], "seq": seq, "text": text_path.name,
            "text_sha256": hashlib.sha256(raw).hexdigest(), "moebench": __version__}
    traces.save(out_path, idx_LTK, p_LTK, meta)
    return traces.load(traces.stored_path(out_path))


def summary(trace: traces.Trace) -> list[dict]:
    """Per recorded layer: its router module, max/mean load, normalised entropy and dead experts
    (metrics.balance)."""
    rows = []
    for li, name in enumerate(trace.meta.get("layers") or range(trace.shape[0])):
        counts_E = np.bincount(trace.idx_LTK[li].reshape(-1).astype(np.int64), minlength=trace.n_experts)
        b = metrics.balance(counts_E)
        rows.append({"layer": li, "module": str(name), "max_over_mean": b["maxvio"] + 1.0,
                     "entropy_norm": b["entropy_norm"], "dead": b["dead"]})
    return rows
