"""train-run: train the shared model on real text, recording the loss and the expert balance at every step.

Recipe (fixed): AdamW, betas 0.9/0.95, weight decay 0.1 on matrices (none on norm scales), linear warm-up then
cosine decay to min_lr_ratio * lr, gradient clipping at 1.0, the loss-free bias update after every optimizer
step. fp32 master weights; workload.dtype bfloat16/float16 runs forward and backward under autocast (the MoE
backend gets bf16 inputs, routers stay fp32); float32 runs plain fp32. Batches are pure functions of
(seed, step) (moebench/data.py), so a run resumed from its checkpoint continues the same loss curve:
bitwise on CPU in fp32 (tests/test_train.py).

Checkpoints: every checkpoint_every steps to $MOEBENCH_CHECKPOINT_DIR/<case_key>/ckpt.pt (default
~/.cache/moebench/checkpoints); a run that finds an unfinished checkpoint of its case resumes from it. One that
cannot be written is recorded (train_run.checkpoint_error) and the run goes on without checkpoints.
A non-finite loss raises harness.NonFiniteLoss(step) carrying the curves so far: the record is `failed`.

Metrics (Legend: L MoE layers, E experts, N steps):
  train_run         the closing-note numbers: strategy, final_val_loss, maxvio_global (validation set, per
                    layer then mean over layers), maxvio_batch_last10pct (mean over the last 10% of steps of the
                    per-batch MaxVio, itself a mean over layers), cv_global, dead_experts (layer-expert pairs
                    with no validation token), dead_experts_train_last10pct, dropped_frac, steps, resumed_from
  loss_curve        total loss per step (lm + aux + z); lm_loss_curve, aux_loss_curve, grad_norm_curve
  val_curve         [{step, val_loss, maxvio_global}] every eval_every steps and at the end
  maxvio_batch      per step, mean over layers; maxvio_batch_per_layer [N][L]; cv_batch per step
  load              val_final [L][E] (validation loads at the end), train_last10pct [L][E], at_eval [{step, [L][E]}]
  balance           metrics.balance_block of the final validation batches (what report/compare read)
  step_ms, tokens_per_s, tflops, ...  (metrics.rates over this process's steps), memory, data, params
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from moebench import data, envinfo, metrics
from moebench.core import DTYPES, NonFiniteLoss, memory
from moebench.model import MoEModel
from moebench.registry import get
from moebench.routing import dropped_fraction
from moebench.spec import Case, RouterSpec, TrainOptions

BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0
FLUSH_EVERY = 50  # steps between host syncs (non-finite checks, per-step stats)


def lr_at(step: int, o: TrainOptions) -> float:
    """Linear warm-up over lr_warmup_steps ((step+1)/W * lr), then cosine from lr to min_lr_ratio * lr."""
    if step < o.lr_warmup_steps:
        return o.lr * (step + 1) / o.lr_warmup_steps
    progress = min(1.0, (step - o.lr_warmup_steps) / max(1, o.steps - o.lr_warmup_steps))
    lo = o.lr * o.min_lr_ratio
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * progress))


def strategy(r: RouterSpec) -> str:
    """A one-line name of the balancing strategy, e.g. 'bias u=0.001 + groups 2/4'."""
    parts = ["expert choice"] if r.kind == "expert_choice" else [
        {"none": "none", "aux": f"aux alpha={r.aux_alpha:g}", "bias": f"bias u={r.bias_rate:g}"}[r.balance]]
    if r.n_group > 1:
        parts.append(f"groups {r.topk_group}/{r.n_group}")
    if r.z_loss:
        parts.append(f"z-loss {r.z_loss:g}")
    if r.capacity_factor is not None and r.kind == "topk":
        parts.append(f"capacity {r.capacity_factor:g}" + (" null expert" if r.null_expert else ""))
    return " + ".join(parts)


def checkpoint_path(case: Case, base: str | Path | None = None) -> Path:
    base = base or os.environ.get("MOEBENCH_CHECKPOINT_DIR") or Path.home() / ".cache" / "moebench" / "checkpoints"
    return Path(base) / case.key / "ckpt.pt"


def _param_groups(model: torch.nn.Module) -> list[dict]:
    params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


class History:
    """Everything a record reports, as plain lists (saved in checkpoints, so a resumed run reports it all)."""
    KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "maxvio_L", "cv_L", "dropped")

    def __init__(self, L: int, E: int, state: dict | None = None):
        self.curves = {k: [] for k in self.KEYS}
        self.val: list[dict] = []
        self.tail_LE = np.zeros((L, E), dtype=np.int64)
        if state:
            self.curves, self.val = state["curves"], state["val"]
            self.tail_LE = np.asarray(state["tail_LE"], dtype=np.int64)

    def state(self) -> dict:
        return {"curves": self.curves, "val": self.val, "tail_LE": self.tail_LE.tolist()}


def run(case: Case, device: torch.device | str, *, checkpoint_dir: str | Path | None = None,
        on_step=None) -> dict:
    """Train case.model for case.workload.train.steps steps; returns the record's metrics dict.
    on_step(step, model), if given, runs after each step (tests use it to plant faults)."""
    device = torch.device(device)
    w, spec, o = case.workload, case.model, case.workload.train
    backend = get(case.backend)
    opts = backend.call_options(case.backend_options, w.gemm_dtype)
    corpus = data.load()
    torch.manual_seed(w.seed)
    model = MoEModel(spec, backend, opts, seed=w.seed).to(device)  # fp32 master weights
    opt = torch.optim.AdamW(_param_groups(model), lr=o.lr, betas=BETAS, fused=device.type == "cuda" or None)
    amp = (lambda: torch.autocast(device.type, dtype=DTYPES[w.dtype])) if w.dtype != "float32" else nullcontext
    L, E, B, S = len(model.moe_layers), spec.n_experts, w.batch, w.seq
    train_N = corpus.train_N.to(device)
    val_ids = data.val_batches(corpus.val_N.to(device), B, S, o.eval_batches)
    tail_start = o.steps - max(1, o.steps // 10)
    cap_C = backend.capacity(w.tokens, spec.top_k, E, **opts) if backend.capacity is not None else None

    ckpt = checkpoint_path(case, checkpoint_dir) if o.checkpoint_every else None
    start, hist = 0, History(L, E)
    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, map_location=device, weights_only=True)
        if st["case_key"] == case.key and st["next_step"] < o.steps:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start, hist = st["next_step"], History(L, E, st["hist"])
    resumed_from, ckpt_error = start or None, None

    cuda = device.type == "cuda"
    pending: list = []
    step_ms: list[float] = []

    def partial() -> dict:  # what a failed record keeps: the curves up to the failing step
        done = len(hist.curves["loss"])
        return _curves(hist, L) | {"train_run": {"strategy": strategy(spec.router), "steps_done": done,
                                                 "resumed_from": resumed_from}}

    def flush():
        """Sync once: move the pending steps' numbers to the host, check that every loss is finite."""
        if not pending:
            return
        if cuda:
            torch.cuda.synchronize()
        steps = [p["step"] for p in pending]
        scal = torch.stack([torch.stack([p["loss"], p["lm"], p["aux"], p["gn"].float(), p["dropped"]])
                            for p in pending]).double().cpu().numpy()
        counts_NLE = torch.stack([p["counts"] for p in pending]).cpu().numpy()
        for i, step in enumerate(steps):
            loss = float(scal[i, 0])
            if not math.isfinite(loss):
                pending.clear()
                err = NonFiniteLoss(step, loss)
                err.metrics = partial()
                raise err
            c = hist.curves
            c["loss"].append(loss)
            c["lm_loss"].append(float(scal[i, 1]))
            c["aux_loss"].append(float(scal[i, 2]))
            c["grad_norm"].append(_finite(float(scal[i, 3])))
            bal = [metrics.balance(counts_NLE[i, l]) for l in range(L)]
            c["maxvio_L"].append([b["maxvio"] for b in bal])
            c["cv_L"].append([b["cv"] for b in bal])
            c["dropped"].append(dropped_fraction(counts_NLE[i], cap_C) if cap_C is not None else float(scal[i, 4]))
            if step >= tail_start:
                hist.tail_LE += counts_NLE[i]
        for p in pending:
            step_ms.append(p["t"]() if callable(p["t"]) else p["t"])
        pending.clear()

    def evaluate(step: int) -> np.ndarray:
        model.eval()
        losses, counts = [], []
        with torch.no_grad():
            for ids in val_ids:
                with amp():
                    out = model(ids, ids)
                losses.append(out["lm_loss"].float())
                counts.append(torch.stack([r.counts_E for r in out["routes"]]))
        model.train()
        val_loss = torch.stack(losses).mean().item()
        counts_BLE = torch.stack(counts).cpu().numpy()
        if not math.isfinite(val_loss):
            err = NonFiniteLoss(step, val_loss)
            err.metrics = partial()
            raise err
        glob = metrics.balance_block(counts_BLE.tolist())["global"]
        hist.val.append({"step": step + 1, "val_loss": val_loss, "maxvio_global": glob["maxvio"],
                         "counts": counts_BLE.sum(0).tolist()})
        return counts_BLE

    t_wall = time.perf_counter()
    model.train()
    for step in range(start, o.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o)
        ids = data.train_batch(train_N, B, S, w.seed, step)
        t0 = _stamp(cuda)
        with amp():
            out = model(ids, ids)
        out["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        t1 = _stamp(cuda)
        dropped = [r.dropped for r in out["routes"] if r.dropped is not None]
        pending.append({"step": step, "loss": out["loss"].detach().float(), "lm": out["lm_loss"].detach().float(),
                        "aux": out["aux_loss"].detach().float(), "gn": gn.detach(),
                        "dropped": torch.stack(dropped).float().mean() if dropped else out["loss"].new_zeros(()),
                        "counts": torch.stack([r.counts_E for r in out["routes"]]),
                        "t": (lambda a=t0, b=t1: a.elapsed_time(b)) if cuda else (t1 - t0) * 1e3})
        last = step + 1 == o.steps
        do_eval = last or (o.eval_every and (step + 1) % o.eval_every == 0)
        do_ckpt = bool(o.checkpoint_every) and ((step + 1) % o.checkpoint_every == 0 or last)
        if len(pending) >= FLUSH_EVERY or do_eval or do_ckpt:
            flush()
        if do_eval:
            val_counts_BLE = evaluate(step)
        if do_ckpt and ckpt_error is None:
            try:
                _save(ckpt, {"case_key": case.key, "next_step": step + 1, "model": model.state_dict(),
                             "opt": opt.state_dict(), "hist": hist.state()})
            except OSError as e:  # a safety net that cannot be written must not end the measurement: recorded
                ckpt_error = f"step {step + 1}: cannot write {ckpt}: {e.strerror or e}"
        if on_step is not None:
            on_step(step, model)
    flush()
    wall_s = time.perf_counter() - t_wall  # the last step always evaluated: val_counts_BLE is set

    m = _curves(hist, L)
    ceiling = envinfo.ceiling(device)
    if step_ms:
        m |= metrics.rates(step_ms, w.tokens, spec.flops_per_token(S) * 3, ceiling["tflops"],
                           metrics.datasheet_peak(envinfo.gpu_name()))
    bal = metrics.balance_block(val_counts_BLE.tolist())
    tail = [metrics.balance(hist.tail_LE[l]) for l in range(L)]
    mv_batch = m["maxvio_batch"]
    n_tail = o.steps - tail_start
    m |= memory(device) | {
        "balance": bal,
        "load": {"val_final": bal["counts_global"], "train_last10pct": hist.tail_LE.tolist(),
                 "at_eval": [{"step": v["step"], "counts": v["counts"]} for v in hist.val]},
        "data": corpus.info, "params": spec.params(),
        "train_run": {
            "strategy": strategy(spec.router),
            "final_val_loss": hist.val[-1]["val_loss"],
            "maxvio_global": bal["global"]["maxvio"],
            "maxvio_batch_last10pct": float(np.mean(mv_batch[-n_tail:])),
            "cv_global": bal["global"]["cv"],
            "dead_experts": bal["global"]["dead"],
            "dead_experts_train_last10pct": int(sum(t["dead"] for t in tail)),
            "dropped_frac": float(np.mean(hist.curves["dropped"])),
            "steps": o.steps, "tokens_per_step": w.tokens, "moe_layers": L,
            "resumed_from": resumed_from, "checkpoint": str(ckpt) if ckpt else None, "checkpoint_error": ckpt_error,
            "wall_s": wall_s,
        },
    }
    return m


def _curves(hist: History, L: int) -> dict:
    c = hist.curves
    return {"loss_curve": c["loss"], "lm_loss_curve": c["lm_loss"], "aux_loss_curve": c["aux_loss"],
            "grad_norm_curve": c["grad_norm"], "dropped_curve": c["dropped"],
            "maxvio_batch": [float(np.mean(v)) for v in c["maxvio_L"]], "maxvio_batch_per_layer": c["maxvio_L"],
            "cv_batch": [float(np.mean(v)) for v in c["cv_L"]],
            "val_curve": [{k: v[k] for k in ("step", "val_loss", "maxvio_global")} for v in hist.val]}


def _stamp(cuda: bool):
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _save(path: Path, state: dict) -> None:
    """Atomic: write beside, then rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def summary_table(records: list[dict]) -> str:
    """Markdown table of the closing-note numbers of train-run records (python -m moebench.train FILE...)."""
    rows = ["| model | strategy | status | final val loss | MaxVio_global | MaxVio_batch (last 10%) | dead experts |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("case", {}).get("workload", {}).get("level") != "train-run":
            continue
        t = (r.get("metrics") or {}).get("train_run") or {}
        num = {k: f"{t[k]:.4f}" if isinstance(t.get(k), float) else "" for k in
               ("final_val_loss", "maxvio_global", "maxvio_batch_last10pct")}.get
        status = r["status"] + (f" ({r['reason']})" if r["status"] != "ok" else "")
        rows.append(f"| {r['case']['model']['name']} | {t.get('strategy', '')} | {status} | {num('final_val_loss')} "
                    f"| {num('maxvio_global')} | {num('maxvio_batch_last10pct')} | {t.get('dead_experts', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    from moebench import results

    loaded = results.read(sys.argv[1:])
    for p in loaded.problems:
        print(p, file=sys.stderr)
    print(summary_table(loaded.records))
