"""Balance metrics, timing statistics, FLOP rates.

Load c_i = tokens routed to expert i (per layer, per batch).
  MaxVio = (max c - mean c) / mean c       (Loss-Free Balancing, arXiv 2408.15664)
  CV     = std(c) / mean(c)                (population std)
  entropy_norm = H(c / sum c) / log(E)     (1 = perfectly even)
  dead   = #{i : c_i = 0}
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np


def balance(counts_E: Sequence[float]) -> dict:
    c = np.asarray(counts_E, dtype=np.float64)
    E, total = c.size, c.sum()
    if total <= 0:
        return {"maxvio": float("nan"), "cv": float("nan"), "entropy_norm": float("nan"), "dead": int(E)}
    mean = total / E
    frac = c / total
    nz = frac[frac > 0]
    ent = float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 1.0
    return {"maxvio": float((c.max() - mean) / mean), "cv": float(c.std() / mean),
            "entropy_norm": ent, "dead": int((c == 0).sum())}


def balance_block(per_batch_counts: Sequence[Sequence[Sequence[float]]]) -> dict:
    """per_batch_counts[b][layer][expert] -> {global, per_batch_mean, per_layer, counts_global}.
    global: metrics of the counts summed over all batches and layers' own loads (per layer, then averaged)."""
    arr = np.asarray(per_batch_counts, dtype=np.float64)  # B x L x E
    if arr.size == 0:
        return {}
    B, L, E = arr.shape
    glob_LE = arr.sum(0)
    per_layer = [balance(glob_LE[l]) for l in range(L)]
    per_batch = [[balance(arr[b, l]) for l in range(L)] for b in range(B)]

    def mean_of(rows, k):
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        return float(np.mean(vals)) if vals else float("nan")

    flat_batch = [r for rows in per_batch for r in rows]
    return {
        "global": {k: mean_of(per_layer, k) for k in ("maxvio", "cv", "entropy_norm")}
        | {"dead": int(sum(r["dead"] for r in per_layer))},
        "per_batch_mean": {k: mean_of(flat_batch, k) for k in ("maxvio", "cv", "entropy_norm")},
        "per_layer": per_layer,
        "counts_global": glob_LE.astype(int).tolist(),
    }


def quantiles(samples: Sequence[float]) -> dict:
    s = np.asarray(samples, dtype=np.float64)
    p20, p50, p80 = np.percentile(s, [20, 50, 80])
    return {"p20": float(p20), "p50": float(p50), "p80": float(p80), "mean": float(s.mean()),
            "min": float(s.min()), "n": int(s.size)}


def rates(step_ms: Sequence[float], tokens: int, flops_per_token: float, ceiling_tflops: float | None,
          datasheet_tflops: float | None) -> dict:
    """tokens/s and TFLOP/s from step times (p20 of tokens/s comes from p80 of time, and so on)."""
    q = quantiles(step_ms)
    tps = {k: tokens / (q[t] / 1e3) for k, t in (("p20", "p80"), ("p50", "p50"), ("p80", "p20"))}
    tflops = tps["p50"] * flops_per_token / 1e12
    return {
        "step_ms": q | {"samples": [float(x) for x in step_ms]},
        "tokens_per_s": tps,
        "spread": (q["p80"] - q["p20"]) / q["p50"],
        "flops_per_token": flops_per_token,
        "tflops": tflops,
        "mfu_measured": tflops / ceiling_tflops if ceiling_tflops else None,
        "mfu_datasheet": tflops / datasheet_tflops if datasheet_tflops else None,
    }


def median_ci(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Distribution-free interval of the median: the order statistics x_(j) and x_(n+1-j) for the largest j with
    P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2. None when n is too small for any interval (n < 6 at 95%)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    j = _median_rank(x.size, confidence)
    return None if j == 0 else [float(x[j - 1]), float(x[x.size - j])]


@functools.lru_cache(maxsize=4096)
def _median_rank(n: int, confidence: float) -> int:
    """The j of median_ci, exact (no scipy: the timing loop calls it after every block)."""
    alpha, j, cdf = (1 - confidence) / 2, 0, 0.0
    total = 2.0 ** n if n < 1000 else None
    if total is None:  # normal approximation for very many blocks
        return max(0, int(math.floor(n / 2 - 1.959963984540054 * math.sqrt(n) / 2)))
    while j + 1 <= n // 2:
        cdf += math.comb(n, j) / total  # P(B = j), summed: P(B <= j) = P(B < j + 1)
        if cdf > alpha:
            break
        j += 1
    return j


# A record is `noisy` when its median was not pinned down (precision), its steps spread too widely, or its block
# medians drift from the first third of the run to the last (judged from 15 blocks on: a shift over 5% that the
# two thirds' block medians show beyond their scatter, Mann-Whitney p < 0.01).
NOISE = {"spread": 0.10, "drift": 0.05}


def noise(rates_: dict, precision: dict) -> str | None:
    """Why a timed record cannot be taken as one plain number, or None. `rates_` from rates(), `precision` from
    moebench.core.timing.summarize()."""
    why = []
    if not precision.get("reached"):
        hw = precision.get("halfwidth")
        ci = f"±{hw:.1%}" if hw is not None and math.isfinite(hw) else "no interval"
        why.append(f"precision {precision['target'] * 100:g}% not reached: 95% CI of the median {ci} after "
                   f"{precision['time_s']:.1f} s, {precision['n_steps']} steps in {precision['n_blocks']} blocks")
    if rates_["spread"] > NOISE["spread"]:
        why.append(f"spread {rates_['spread']:.1%} > {NOISE['spread']:.0%}")
    blocks = precision.get("block_p50_ms") or []
    if len(blocks) >= 15:  # five blocks a third at least: fewer cannot show a shift beyond their own scatter
        from scipy.stats import mannwhitneyu
        third = len(blocks) // 3
        first, last = blocks[:third], blocks[-third:]
        d = (np.median(last) - np.median(first)) / np.median(blocks)
        if abs(d) > NOISE["drift"] and mannwhitneyu(first, last, alternative="two-sided").pvalue < 0.01:
            why.append(f"drift {d:+.1%} from the first third of the blocks to the last")
    return "; ".join(why) or None


def finite(v) -> float | None:
    """v as a float, or None when it is missing, not a number or not finite (table cells, claims)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64; inf when a has non-finite values."""
    import torch

    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff


# Dense bf16 tensor-core peaks from vendor datasheets (TFLOP/s, dense, no sparsity), by GPU name fragment.
DATASHEET_BF16 = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
                  "A100": 312.0, "L4": 121.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.2}


def datasheet_peak(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for frag, v in DATASHEET_BF16.items():
        if frag in gpu_name:
            return v
    return None
