"""What a run prints: one line per finished case and the table at the end (rich markup; names and reasons are
escaped: "[/]" in a reason is text). Shared by the single-process runner and the torchrun launcher."""
from __future__ import annotations

from rich.markup import escape

STYLE = {"ok": "green", "skipped": "yellow", "mismatch": "red", "oom": "magenta", "timeout": "red",
         "failed": "red"}


def _gib(m: dict):
    mem = m.get("memory", {})
    return mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))


def line(rec: dict) -> str:
    st = rec["status"]
    m = rec.get("metrics") or {}
    detail = rec.get("reason", "")
    if st == "ok":
        tps = m["tokens_per_s"]["p50"]
        p = m.get("precision") or {}
        ci = f" ±{p['halfwidth']:.1%}" if p.get("halfwidth") is not None and p["halfwidth"] < 1 else ""
        detail = f"{tps:,.0f} tok/s{ci}  spread {m['spread']:.1%}  peak {_gib(m):.2f} GiB"
        if m.get("noisy"):
            detail += f"  NOISY: {m['noisy']}"
    style = "yellow" if st == "ok" and m.get("noisy") else STYLE[st]
    label = "noisy" if st == "ok" and m.get("noisy") else st
    return f"[{style}]{label:>8}[/] {escape(rec['label'])}  [dim]{escape(detail)}[/]"


def summary_table(records: list[dict]):
    from rich.table import Table

    t = Table(title="moebench results", show_lines=False)
    for col in ("model", "backend", "workload", "status", "tokens/s", "±95%", "spread", "TFLOP/s", "peak GiB",
                "MaxVio"):
        t.add_column(col, justify="left" if col in ("model", "backend", "workload", "status") else "right")
    for r in records:
        c, m = r["case"], r.get("metrics") or {}
        w = c["workload"]
        opts = "".join(f",{k}={v}" for k, v in sorted(c.get("backend_options", {}).items()))
        if w.get("gemm_dtype", "default") != "default":  # the expert GEMMs' dtype goes with the backend
            opts += f" [{w['gemm_dtype']}]"
        wl = (f"{w['level']}/{w['mode']} {w.get('exec', 'eager')} {w['dtype']} {w['batch']}x{w['seq']} "
              f"{w['routing']}")
        status = f"[{STYLE[r['status']]}]{r['status']}[/]"
        if r["status"] == "ok":
            bal = m.get("balance", {}).get("global", {})
            hw = (m.get("precision") or {}).get("halfwidth")
            if m.get("noisy"):
                status = "[yellow]ok, noisy[/]"
            row = (f"{m['tokens_per_s']['p50']:,.0f}", f"{hw:.1%}" if hw is not None and hw < 1 else "",
                   f"{m['spread']:.1%}", f"{m['tflops']:.2f}", f"{_gib(m):.2f}",
                   f"{bal.get('maxvio', float('nan')):.3f}")
        else:
            row = ("",) * 6
        t.add_row(escape(c["model"]["name"]), escape(c["backend"] + opts), escape(wl), status, *row)
    return t
