"""ModelSpec, RouterSpec, Workload and Case: validated (pydantic), hashable into a stable case_key.

Presets are plain named specs taken from what the seed systems publish, and (moebench/models.py, plain data
merged in at the end of this file) the published configurations of open MoE models, each whole and as
`<name>-layer`.
Legend: D model dim, F expert hidden, E routed experts, K top-k, L layers, V vocab.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moebench.gemm_dtypes import GEMM_DTYPES
from moebench.models import MODELS

DTYPES = ("float32", "bfloat16", "float16")
# learned | uniform | zipf:<s> | hot:<k> | trace:<path> (a recorded routing, moebench/traces.py)
ROUTING_RE = re.compile(r"^(learned|uniform|zipf:(\d+(\.\d+)?)|hot:(\d+)|trace:(\S.*))$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSpec(_Strict):
    """How tokens pick experts. The balance strategy and z-loss are router options, not backends."""
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    temperature: float = Field(1.0, gt=0)
    norm_topk: bool = True                  # renormalise the K selected weights to sum to 1
    route_scale: float = Field(1.0, gt=0)   # multiply gate weights (DeepSeek-V3 routed_scaling_factor)
    n_group: int = Field(1, ge=1)           # group-limited routing: E experts in n_group groups ...
    topk_group: int = Field(1, ge=1)        # ... tokens may only pick from the best topk_group groups
    balance: Literal["none", "aux", "bias"] = "none"
    aux_alpha: float = Field(0.01, ge=0)    # Switch aux loss coefficient (balance = "aux")
    bias_rate: float = Field(1e-3, ge=0)    # loss-free bias update speed u (balance = "bias")
    z_loss: float = Field(0.0, ge=0)        # ST-MoE router z-loss coefficient
    capacity_factor: float | None = Field(None, gt=0)  # None: dropless; C = ceil(cf * T * K / E) per expert
    kind: Literal["topk", "expert_choice"] = "topk"  # token choice | expert choice (each expert its top-C tokens)
    null_expert: bool = False               # capacity overflow goes to a null expert (its gate share is lost)
    aux_ramp_steps: int = Field(0, ge=0)    # aux coefficient ramps linearly over the first N optimizer steps
    moe_warmup_steps: int = Field(0, ge=0)  # routed-expert output ramps linearly over the first N steps
    # DeepSeek-V3's e_score_correction_bias as fixed values, one per expert: top-k on s + b, gate weights from
    # s alone. With balance = "bias" they are the loss-free bias's starting values (then updated), else fixed.
    score_bias: tuple[float, ...] | None = None
    # Mixtral's router_jitter_noise j: in training only, the router's input is multiplied by uniform noise in
    # [1 - j, 1 + j] (the experts get the input unjittered)
    jitter_noise: float = Field(0.0, ge=0, lt=1)

    @field_validator("score_bias")
    @classmethod
    def _finite_bias(cls, v):
        if v is not None and not all(math.isfinite(b) for b in v):
            raise ValueError("score_bias values must be finite")
        return v


class ModelSpec(_Strict):
    name: str = "custom"
    vocab_size: int = Field(32000, ge=2)
    d_model: int = Field(ge=1)
    n_layers: int = Field(1, ge=1)
    n_heads: int = Field(1, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)   # None: = n_heads (MHA); fewer: GQA
    d_head: int | None = Field(None, ge=1)       # attention head dim (None: d_model / n_heads; Qwen3: 128)
    max_seq_len: int = Field(2048, ge=1)
    n_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    d_expert: int = Field(ge=1)                  # F, hidden size of one routed expert
    n_shared_experts: int = Field(0, ge=0)
    d_shared: int | None = Field(None, ge=1)     # hidden size of one shared expert (None: d_expert)
    shared_gate: bool = False                    # Qwen2-MoE: shared-expert output * sigmoid(x @ w_D1) a token
    first_dense_layers: int = Field(0, ge=0)     # DeepSeek: the first layers use a dense FFN
    d_dense: int | None = Field(None, ge=1)      # hidden size of that dense FFN (None: d_expert * top_k)
    tie_embeddings: bool = True
    moe_output_scale: float = 1.0                # MoEForge mlp_residual_scale
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention: Literal["sdpa", "math", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn"] = "sdpa"
    norm: Literal["torch", "liger", "triton"] = "torch"
    router: RouterSpec = RouterSpec()

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.shared_gate and not self.n_shared_experts:
            raise ValueError("shared_gate scales the shared experts' output: it needs n_shared_experts >= 1")
        r = self.router
        if r.score_bias is not None and len(r.score_bias) != self.n_experts:
            raise ValueError(f"router.score_bias has {len(r.score_bias)} values; it needs one per expert "
                             f"(n_experts = {self.n_experts})")
        if self.n_experts % r.n_group:
            raise ValueError(f"router.n_group ({r.n_group}) must divide n_experts ({self.n_experts})")
        if r.topk_group > r.n_group:
            raise ValueError(f"router.topk_group ({r.topk_group}) must be <= router.n_group ({r.n_group})")
        if r.n_group > 1 and self.top_k > r.topk_group * (self.n_experts // r.n_group):
            raise ValueError("top_k exceeds the experts available in router.topk_group groups")
        if r.kind == "expert_choice" and (r.balance != "none" or r.n_group > 1 or r.null_expert):
            raise ValueError("router.kind 'expert_choice' is balanced by construction: it takes balance = 'none', "
                             "n_group = 1 and no null_expert")
        if r.null_expert and r.capacity_factor is None:
            raise ValueError("router.null_expert takes capacity overflow: set router.capacity_factor too")
        if self.first_dense_layers > self.n_layers:
            raise ValueError("first_dense_layers must be <= n_layers")
        return self

    # ---- derived sizes ----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def shared_hidden(self) -> int:
        """Hidden size of all shared experts merged into one SwiGLU MLP."""
        return self.n_shared_experts * (self.d_shared or self.d_expert)

    @property
    def dense_hidden(self) -> int:
        return self.d_dense or self.d_expert * self.top_k

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_dense_layers

    def params(self) -> dict:
        """Total and active parameter counts (embeddings counted once when tied)."""
        D, F, E, K = self.d_model, self.d_expert, self.n_experts, self.top_k
        attn = D * self.n_heads * self.head_dim * 2 + D * self.kv_heads * self.head_dim * 2
        norms = 2 * D
        expert = 3 * D * F
        shared = 3 * D * self.shared_hidden + (D if self.shared_gate else 0)
        router = D * E
        dense_ffn = 3 * D * self.dense_hidden
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        moe_layer_total = attn + norms + router + shared + E * expert
        moe_layer_active = attn + norms + router + shared + K * expert
        dense_layer = attn + norms + dense_ffn
        base = embed + D  # final norm
        nd, nm = self.first_dense_layers, self.n_moe_layers
        total = base + nd * dense_layer + nm * moe_layer_total
        active = base + nd * dense_layer + nm * moe_layer_active
        return {"total": total, "active": active, "expert_per_layer": E * expert, "embedding": embed}

    def layer_flops_per_token(self) -> float:
        """Forward matmul FLOPs of one MoE layer's experts per token: 6*K*D*F (+ shared). Router excluded,
        as in the SonicMoE / issue tables (it is 2*D*E, small next to 6*K*D*F)."""
        return 6.0 * self.d_model * (self.top_k * self.d_expert + self.shared_hidden)

    def flops_per_token(self, seq: int) -> float:
        """Forward matmul FLOPs per token of the whole model at sequence length seq: every projection
        (2 FLOPs per weight used), active experts only, causal attention scores counted half."""
        D = self.d_model
        attn_proj = 2 * (D * self.n_heads * self.head_dim * 2 + D * self.kv_heads * self.head_dim * 2)
        attn_scores = 2 * 2 * seq * self.n_heads * self.head_dim / 2  # QK^T and AV, causal half
        router = 2 * D * self.n_experts
        dense = 6 * D * self.dense_hidden
        lm_head = 2 * D * self.vocab_size
        per_moe = attn_proj + attn_scores + router + self.layer_flops_per_token()
        per_dense = attn_proj + attn_scores + dense
        return self.n_moe_layers * per_moe + self.first_dense_layers * per_dense + lm_head


class TrainOptions(_Strict):
    """A train-run workload's schedule (moebench/train.py). Fixed there: AdamW betas 0.9/0.95, weight decay 0.1,
    gradient clipping at 1.0. Data: byte tokens of the Python stdlib's .py files (moebench/data.py)."""
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)        # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    eval_every: int = Field(0, ge=0)             # validation loss every N steps (0: at the end only)
    eval_batches: int = Field(4, ge=1)           # validation batches (batch x seq tokens each)
    checkpoint_every: int = Field(0, ge=0)       # checkpoint every N steps; a rerun resumes from it (0: never)
    data: Literal["pystdlib"] = "pystdlib"

    @model_validator(mode="after")
    def _check(self):
        if self.lr_warmup_steps > self.steps:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) must be <= steps ({self.steps})")
        return self


EXECS = ("eager", "compile", "graphs", "compile-graphs")


class Workload(_Strict):
    """What is timed. level: the MoE layer alone, the whole model, or train-run (a training run on real text:
    loss and balance per step, options in `train`); mode: train (fwd+bwd, and the AdamW step at model level)
    or forward; routing: learned | uniform | zipf:<s> | hot:<k> | trace:<path> (recorded top-k choices
    replayed, moebench/traces.py; in a suite file the path is relative to the suite file: moebench/suite.py);
    exec: how the step runs (eager: op by op from Python | compile: torch.compile | graphs: the whole step
    replayed as a CUDA graph | compile-graphs: torch.compile's reduce-overhead; moebench.core.steps). repeats is the fewest timed steps: timing goes on until the
    median is pinned down (Case.precision) or the case's time budget (Case.max_time_s) is spent."""
    level: Literal["layer", "model", "train-run"] = "layer"
    mode: Literal["train", "forward"] = "train"
    exec: Literal["eager", "compile", "graphs", "compile-graphs"] = "eager"  # default: out of the case key, so old keys hold
    # the expert GEMMs' precision (GEMM_DTYPES; default: out of the key); a backend lists the ones it has
    # (registry.Backend.gemm_dtypes), other cases are skipped with the reason
    gemm_dtype: Literal[tuple(GEMM_DTYPES)] = "default"  # type: ignore[valid-type]
    batch: int = Field(1, ge=1)
    seq: int = Field(ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    routing: str = "learned"
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)
    seed: int = 0
    train: TrainOptions | None = None            # level = "train-run" only (filled with defaults there)
    # processes (GPUs) the case spans, for expert parallel backends; batch x seq is per rank. 1 is stored as None
    # so it stays out of the key (exclude_none) and 1-rank keys did not change when it was added
    ranks: int | None = Field(None, ge=1)

    @field_validator("routing")
    @classmethod
    def _routing(cls, v: str) -> str:
        if not ROUTING_RE.match(v):
            raise ValueError(f"routing must be learned, uniform, zipf:<s>, hot:<k> or trace:<path>, "
                             f"got '{v}'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data):
        if isinstance(data, dict) and data.get("level") == "train-run" and data.get("train") is None:
            data = {**data, "train": {}}
        return data

    @model_validator(mode="after")
    def _check_train(self):
        if self.level != "train-run" and self.train is not None:
            raise ValueError(f"train options apply to level = 'train-run' only, not '{self.level}'")
        if self.level == "train-run" and (self.mode != "train" or self.routing != "learned"):
            raise ValueError("level 'train-run' trains the router: it takes mode = 'train' and routing = 'learned'")
        if self.gemm_dtype != "default" and self.dtype != "bfloat16":
            raise ValueError(f"gemm_dtype '{self.gemm_dtype}' runs the expert GEMMs in e4m3 with bf16 outputs: "
                             f"it takes dtype = 'bfloat16', not '{self.dtype}'")
        return self

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: int | None) -> int | None:
        return None if v == 1 else v

    @property
    def tokens(self) -> int:
        """Tokens per rank (all tokens when the case runs in one process)."""
        return self.batch * self.seq

    @property
    def world_size(self) -> int:
        return self.ranks or 1


class Case(_Strict):
    """One measurement: a model spec x a backend (+ options) x a workload."""
    model: ModelSpec
    backend: str
    backend_options: dict = Field(default_factory=dict)
    workload: Workload
    suite: str = "adhoc"
    device: Literal["cpu", "cuda"] = "cpu"
    memory_budget_gib: float | None = Field(None, gt=0)
    timeout_s: float = Field(600, gt=0)
    # timing policy (not in the key): stop when the 95% interval of the median is within `precision` of it,
    # or after max_time_s of timed steps (then the record is flagged noisy: precision not reached)
    precision: float = Field(0.01, gt=0, lt=1)
    max_time_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        w, m = self.workload, self.model
        if w.routing.startswith("hot:") and int(w.routing[4:]) > m.n_experts:
            raise ValueError(f"routing {w.routing}: more hot experts than n_experts ({m.n_experts})")
        if w.level in ("model", "train-run") and w.seq > m.max_seq_len:
            raise ValueError(f"workload.seq ({w.seq}) exceeds model max_seq_len ({m.max_seq_len})")
        if w.level == "train-run" and m.vocab_size < 256:
            raise ValueError(f"level 'train-run' trains on byte tokens: model vocab_size ({m.vocab_size}) must be >= 256")
        if m.router.kind == "expert_choice" and w.routing != "learned":
            raise ValueError(f"router.kind 'expert_choice' picks tokens itself: routing must be 'learned', not '{w.routing}'")
        if w.routing.startswith("trace:"):
            from moebench import traces  # a leaf module (numpy only); read when a case names a trace
            traces.check(w.routing[len("trace:"):], m.n_experts, m.top_k, m.name)
        return self

    @property
    def key(self) -> str:
        """Stable hash of what is measured (spec + backend + options + workload); not the suite, device or
        budget, so the same case run on two machines matches in `moebench compare`. (exclude_none: a workload's
        unset train options stay out of the hash, so layer/model keys did not change when they were added.)"""
        # exclude_defaults: a field added later with a default (= the old behaviour) keeps old keys valid
        blob = json.dumps({"model": self.model.model_dump(mode="json", exclude_defaults=True),
                           "backend": self.backend, "options": self.backend_options,
                           "workload": self.workload.model_dump(mode="json", exclude_defaults=True)},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        w = self.workload
        opts = "".join(f",{k}={v}" for k, v in sorted(self.backend_options.items()))
        return (f"{self.model.name} | {self.backend}{opts} | {w.level}/{w.mode} {w.dtype} "
                f"T={w.tokens} {w.routing}" + (f" ranks={w.ranks}" if w.ranks else "")
                + (f" {w.exec}" if w.exec != "eager" else "")
                + (f" gemm={w.gemm_dtype}" if w.gemm_dtype != "default" else ""))


def _moeforge(name: str, D: int, H: int, L: int, E: int, K: int = 2) -> ModelSpec:
    """MoEForge config.py: F = 256*ceil(int(D*5/3)/256); shared F = 256*ceil(int(D*5/3*0.5)/256);
    fused qkv, MHA, tied embeddings, V=32000, mlp_residual_scale 0.5, aux + z-loss."""
    F = 256 * math.ceil(int(D * 5 / 3) / 256)
    Fs = 256 * math.ceil(int(D * 5 / 3 * 0.5) / 256)
    return ModelSpec(name=name, vocab_size=32000, d_model=D, n_heads=H, n_layers=L, n_experts=E, top_k=K,
                     d_expert=F, n_shared_experts=1, d_shared=Fs, max_seq_len=2048, moe_output_scale=0.5,
                     router=RouterSpec(balance="aux", aux_alpha=0.01, z_loss=1e-3))


def _layer(name: str, D: int, F: int, E: int, K: int, shared: int = 0, **router) -> ModelSpec:
    """A layer-level shape (T comes from the workload)."""
    return ModelSpec(name=name, d_model=D, d_expert=F, n_experts=E, top_k=K, n_shared_experts=shared,
                     n_heads=1, router=RouterSpec(**router))


PRESETS: dict[str, ModelSpec] = {
    # MoEForge (github MadrasLe/MoEForge, moeforge/config.py SMALL/MEDIUM/LARGE_CONFIG)
    "moeforge-small": _moeforge("moeforge-small", D=512, H=16, L=6, E=4),
    "moeforge-medium": _moeforge("moeforge-medium", D=1024, H=16, L=12, E=8),
    "moeforge-large": _moeforge("moeforge-large", D=2048, H=32, L=24, E=8),
    # Optimal MoE LM README defaults: V=50257 (GPT-2), D=512, L=8, 8 heads, 2 KV heads, E=8, K=2, seq 512,
    # loss-free bias balancing + z-loss. The README gives no expert hidden size: SwiGLU's 8/3*D (1365) is
    # assumed here; tests/test_spec.py documents how far that is from its ~47M / ~13M claim.
    "optimal-moe-lm": ModelSpec(name="optimal-moe-lm", vocab_size=50257, d_model=512, n_layers=8, n_heads=8,
                                n_kv_heads=2, n_experts=8, top_k=2, d_expert=1365, max_seq_len=512,
                                router=RouterSpec(balance="bias", bias_rate=1e-3, z_loss=1e-3)),
    # SparseMoE / Switch (README + its code, github Anuj0x/SmartRoute switch_transformers/switch_transformer.py).
    # Each expert there is ONE nn.Linear(D, D) with bias (no FFN, no activation); moebench experts are SwiGLU,
    # so d_expert = D/3 gives the same weights and FLOPs per expert: 3*D*F = D*(D+1) exactly at D=512 (F=171),
    # +0.1% at D=1024 (F=342). Its output head is a separate Linear (untied). Not modelled: its learned
    # position embeddings, LayerNorm and biases (~0.6M at Base) and its non-causal attention. Top-1, gate =
    # the softmax probability (no renormalisation), capacity drop in the router.
    # "Base" row: the quick-start config, D=512, 8 experts, 8 heads, depth 12, V=50000, aux loss alpha 0.01,
    # capacity factor 1.0.
    "switch-base": ModelSpec(name="switch-base", vocab_size=50000, d_model=512, n_layers=12, n_heads=8,
                             n_experts=8, top_k=1, d_expert=171, max_seq_len=2048, tie_embeddings=False,
                             router=RouterSpec(norm_topk=False, balance="aux", aux_alpha=0.01,
                                               capacity_factor=1.0)),
    # "Large" row (16 experts): the README's advanced example, the only config with 16 experts: D=1024,
    # 16 heads, depth 24, V=80000, capacity factor 1.5, biased (loss-free) gating. As written that call raises
    # in its code (use_aux_loss defaults to True and both may not be set); its evident intent is taken.
    # The README publishes no configuration for the "XL" row (32 experts), so there is no switch-xl preset.
    "switch-large": ModelSpec(name="switch-large", vocab_size=80000, d_model=1024, n_layers=24, n_heads=16,
                              n_experts=16, top_k=1, d_expert=342, max_seq_len=2048, tie_embeddings=False,
                              router=RouterSpec(norm_topk=False, balance="bias", capacity_factor=1.5)),
    # MoE Transformer README example: hidden 2048, 16 layers, 32 heads, V=32000, 8 routed + 1 shared experts,
    # top-2, moe_intermediate_size 8192, n_group 2 / topk_group 2, bias balancing, aux coef 0.5.
    "moe-transformer": ModelSpec(name="moe-transformer", vocab_size=32000, d_model=2048, n_layers=16,
                                 n_heads=32, n_experts=8, top_k=2, d_expert=8192, n_shared_experts=1,
                                 max_seq_len=2048,
                                 router=RouterSpec(n_group=2, topk_group=2, balance="bias", z_loss=0.0)),
    # MoMoE usage example: embedding_dim 2048, intermediate_dim 1024, 128 experts, 8 chosen (layer only).
    "momoe-layer": _layer("momoe-layer", D=2048, F=1024, E=128, K=8),
    # Layer shapes of the h100 suite (issue 8's table) and small test shapes.
    "olmoe-layer": _layer("olmoe-layer", D=2048, F=1024, E=64, K=8),
    "mixtral-layer": _layer("mixtral-layer", D=4096, F=14336, E=8, K=2),
    "deepseek-fine-layer": _layer("deepseek-fine-layer", D=2048, F=1408, E=64, K=6, shared=2),
    "fine-128x8-layer": _layer("fine-128x8-layer", D=1536, F=256, E=128, K=8),
    "mid-64x4-layer": _layer("mid-64x4-layer", D=1536, F=512, E=64, K=4),
    "coarse-32x2-layer": _layer("coarse-32x2-layer", D=1536, F=1024, E=32, K=2),
    "moeforge-small-layer": _layer("moeforge-small-layer", D=512, F=1365, E=4, K=2),
    "tiny": ModelSpec(name="tiny", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      n_experts=4, top_k=2, d_expert=24, n_shared_experts=1, max_seq_len=128),
    "tiny-layer": _layer("tiny-layer", D=48, F=36, E=6, K=2),
}


def _layer_of(m: ModelSpec) -> ModelSpec:
    """A whole model's MoE layer alone, as _layer: n_heads 1; D, F, E, K, the shared experts and the router
    kept."""
    return ModelSpec(name=f"{m.name}-layer", d_model=m.d_model, d_expert=m.d_expert, n_experts=m.n_experts,
                     top_k=m.top_k, n_shared_experts=m.n_shared_experts, d_shared=m.d_shared,
                     shared_gate=m.shared_gate, moe_output_scale=m.moe_output_scale, n_heads=1,
                     router=m.router)


# Current open MoE models (moebench/models.py: plain data with its sources, importing nothing from moebench)
for _name, _m in MODELS.items():
    PRESETS[_name] = ModelSpec(name=_name, **_m.spec)
    PRESETS[f"{_name}-layer"] = _layer_of(PRESETS[_name])


def preset(name: str, /, **overrides) -> ModelSpec:  # positional-only: `name=` overrides the spec's name
    from moebench.registry import UnknownName
    if name not in PRESETS:
        raise UnknownName("preset", name, PRESETS)
    base = PRESETS[name].model_dump()
    router_over = overrides.pop("router", None) or {}
    base.update(overrides)
    base["router"] = {**base["router"], **router_over}
    return ModelSpec.model_validate(base)
