"""The `moebench` command: run | paired | trace | list | report | compare. Bad input exits 2 with one clear
message."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from moebench import console as cons

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Benchmark Mixture-of-Experts implementations on one shared model spec.")
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)


def _fail(msg: str, code: int = 2):  # the message echoes user input: "[/]" in it is text, not markup
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _csv(s: Optional[str]) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _version(value: bool):
    if value:
        import moebench
        from moebench import envinfo
        out.print(f"moebench {moebench.__version__} (commit {envinfo.git_state().get('git_commit') or 'unknown'})",
                  highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """Benchmark Mixture-of-Experts implementations on one shared model spec."""


STRICT_BAD = ("mismatch", "failed", "timeout")


def _execs(s: Optional[str]) -> list[str] | None:
    from moebench.spec import EXECS
    names = _csv(s)
    for n in names or []:
        if n not in EXECS:
            _fail(f"--exec: unknown execution mode '{n}'; valid: {', '.join(EXECS)}")
    return names


def _backends(s: Optional[str]) -> list[str] | None:
    names = _csv(s)
    for n in names or []:
        if "=" in n:
            _fail(f"--backends takes backend names (comma-separated); '{n}' is an option: options are set in a "
                  f"suite file, e.g. {{ name = \"triton\", recompute = 0 }} (`moebench list backends` shows each "
                  f"backend's options)")
    return names


def _select(cases, match, exclude):
    """Cases whose label contains every --match and no --exclude."""
    return [c for c in cases if all(m in c.label for m in match or []) and not any(x in c.label for x in exclude or [])]


def _resume_hint(out_path: Path) -> str:
    """The command line that continues this run: the same arguments, with --out and --resume."""
    import shlex
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--out", "-o"):
            skip = True
            continue
        if a.startswith("--out=") or a == "--resume":
            continue
        args.append(a)
    return shlex.join(["moebench", *args, "--out", str(out_path), "--resume"])


@app.command()
def run(
    suite: Optional[str] = typer.Option(None, "--suite", "-s", help="suite name or path to a .toml (default: l4 on a GPU, ci on a CPU)"),
    backends: Optional[str] = typer.Option(None, "--backends", "-b", help="comma-separated subset of the suite's backends"),
    exec_: Optional[str] = typer.Option(None, "--exec", "-e", help="eager | compile | graphs (comma-separated): run "
                                        "every workload under these execution modes instead of the suite's"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu | cuda (default: cuda when available)"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="results JSONL (appended); default "
                                            "runs/<suite>-<run id>.jsonl (runs/ is git-ignored)"),
    resume: bool = typer.Option(False, "--resume", help="skip cases already recorded in --out (needs --out)"),
    precision: Optional[float] = typer.Option(None, "--precision", help="time each case until the 95% interval of "
                                              "its median step time is within this fraction (suite default 0.01)"),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="seconds of timed steps per case at most "
                                             "(suite default 10); a case that stops short of --precision is noisy"),
    no_wait: bool = typer.Option(False, "--no-wait", help="do not wait for another moebench process timing the "
                                 "same device: time anyway and flag those records noisy"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when any case ends mismatch, failed or timeout "
                                "(a CI gate)"),
    match: Optional[list[str]] = typer.Option(None, "--match", "-m", help="keep cases whose label contains this "
                                              "(repeatable: all must match)"),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", "-x", help="drop cases whose label contains "
                                                "this (repeatable)"),
    worker: str = typer.Option("auto", "--worker", help="auto | per-case | reuse: worker process per case, or reused"),
    list_cases: bool = typer.Option(False, "--list-cases", help="print the expanded cases and exit"),
    no_report: bool = typer.Option(False, "--no-report", help="do not render the report after the run"),
    nproc: int = typer.Option(1, "--nproc", help="processes per case (expert parallel suites); per node with --nnodes",
                              min=1),
    nnodes: int = typer.Option(1, "--nnodes", help="nodes of a multi-node expert-parallel launch (torchrun's c10d "
                               "rendezvous); the same command on every node, with its own --node-rank"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="with --nnodes: this node, 0..N-1; node 0 "
                                            "writes the results"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="with --nnodes: HOST:PORT of the "
                                                "rendezvous, node 0's address and a free port, the same on every node"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="after timing each case, profile 3 steps "
                                           "with torch.profiler and write the top ops to DIR/<case_key>.txt"),
    model: str | None = typer.Option(None, "--model", help="ad hoc, no suite file: a preset (e.g. "
                                     "qwen3-30b-a3b-layer); see moebench/adhoc.py"),
    shape: str | None = typer.Option(None, "--shape", help="ad hoc: a layer shape, D=2048,F=768,E=128,K=8 "
                                     "(S= shared experts)"),
    tokens: int | None = typer.Option(None, "--tokens", help="ad hoc: tokens per step (default 4096)"),
    seq: int | None = typer.Option(None, "--seq", help="ad hoc: sequence length (default: --tokens for a "
                                   "layer, else the model's max)"),
    level: str | None = typer.Option(None, "--level", help="ad hoc: layer | model (default layer)"),
    mode: str | None = typer.Option(None, "--mode", help="ad hoc: train,forward (comma list; default train)"),
    dtype: str | None = typer.Option(None, "--dtype", help="ad hoc: float32,bfloat16,float16 (default "
                                     "float32)"),
    routing: str | None = typer.Option(None, "--routing", help="ad hoc: learned,uniform,zipf:<s>,hot:<k>,"
                                       "trace:<path> (comma list; default learned)"),
):
    """Run a suite (or, with --model/--shape, ad-hoc cases): one record per case, appended to the results file
    as each case ends."""
    from moebench import registry, runner
    from moebench.suite import SuiteError, load

    dev = device or runner.default_device()
    if dev not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got '{dev}'")
    if worker not in ("auto", "per-case", "reuse"):
        _fail(f"--worker must be auto, per-case or reuse, got '{worker}'")
    if resume and out_path is None:
        _fail("--resume continues a results file: give it with --out FILE")
    if precision is not None and not 0 < precision < 1:
        _fail(f"--precision must be a fraction in (0, 1), e.g. 0.01 for 1%; got {precision}")
    if max_time is not None and not max_time > 0:
        _fail(f"--max-time must be > 0 seconds; got {max_time}")
    execs = _execs(exec_)
    from moebench.distributed import nodes_from_options
    try:
        nodes = nodes_from_options(nnodes, node_rank, rdzv_endpoint)
    except ValueError as e:
        _fail(str(e))
    adhoc_opts = {"--tokens": tokens, "--seq": seq, "--level": level, "--mode": mode, "--dtype": dtype,
                  "--routing": routing}
    if model is not None or shape is not None:
        if suite is not None:
            _fail("give --suite or --model/--shape, not both")
        from moebench import adhoc
        try:
            cases = [c.model_copy(update={k: v for k, v in (("precision", precision), ("max_time_s", max_time))
                                          if v is not None})
                     for e in (execs or [None])
                     for c in adhoc.cases(model=model, shape=shape, tokens=4096 if tokens is None else tokens,
                                          seq=seq, backends=_backends(backends), level=level or "layer",
                                          mode=_csv(mode), dtype=_csv(dtype), routing=_csv(routing), exec_=e,
                                          device=dev)]
        except SuiteError as e:
            _fail(str(e))
        suite = "adhoc"
    else:
        given = [k for k, v in adhoc_opts.items() if v is not None]
        if given:
            _fail(f"{', '.join(given)}: for ad-hoc runs with --model or --shape; a suite file sets its own "
                  "workloads")
        suite = suite or ("l4" if dev == "cuda" else "ci")
        try:
            cases = load(suite, device=dev, backends=_backends(backends), precision=precision, max_time_s=max_time,
                         execs=execs)
        except SuiteError as e:
            _fail(str(e))
        except registry.UnknownName as e:  # from the command line, not the file: name the option
            _fail(f"{'--backends' if str(e).startswith('unknown backend') else '--suite'}: {e}")
    if not cases:
        _fail(f"--backends: suite '{suite}' has no case for backend(s) {backends}")
    cases = _select(cases, match, exclude)
    if not cases:
        _fail(f"--match/--exclude: no case of suite '{suite}' is left")
    if list_cases:
        for c in cases:
            out.print(f"{c.key}  {c.label}", highlight=False)
        raise typer.Exit(0)
    if dev == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail("--device cuda: torch.cuda.is_available() is False on this machine")
    if profile is not None:
        import os
        os.environ["MOEBENCH_PROFILE_DIR"] = str(profile.resolve())  # inherited by the worker processes
    run_id = runner.new_run_id()
    path = out_path or Path("runs") / f"{Path(suite).stem}-{run_id}.jsonl"
    if nodes is not None or nproc > 1 or any(c.workload.world_size > 1 or registry.get(c.backend).needs_process_group
                                             for c in cases):
        from moebench import distributed  # torchrun workers; a case on fewer ranks than --nproc uses the first ones
        try:
            summary = distributed.run(cases, path, nproc=nproc, resume=resume, run_id=run_id, console=err,
                                      wait=not no_wait, nodes=nodes)
        except OSError as e:
            _fail(str(e))
        if nodes is not None and not nodes.lead:  # a follower records nothing: node 0 has the results
            raise typer.Exit(130 if summary.interrupted else 1 if summary.warnings else 0)
    else:
        reuse = None if worker == "auto" else worker == "reuse"
        try:
            summary = runner.run(cases, path, resume=resume, run_id=run_id, reuse_worker=reuse, console=err,
                                 wait=not no_wait)
        except OSError as e:
            _fail(str(e))
    if summary.records:
        out.print(cons.summary_table(summary.records))
    done = len(summary.records)
    noisy = sum(1 for r in summary.records if r["status"] == "ok" and (r.get("metrics") or {}).get("noisy"))
    err.print(f"{done} case(s) recorded in {summary.out}"
              + (f"; {summary.skipped_done} already done (--resume)" if summary.skipped_done else "")
              + (f"; {noisy} ok but noisy (see the NOISY reasons; not plain numbers)" if noisy else ""),
              markup=False)
    if summary.interrupted:
        err.print("[yellow]interrupted[/]: " + escape(f"finished records are safe in {summary.out}; "
                  f"continue with: {_resume_hint(summary.out)}"), soft_wrap=True)
        raise typer.Exit(130)
    if not no_report and summary.records:
        try:
            from moebench import report
        except ImportError:
            report = None
        if report is not None:
            rdir = summary.out.parent / f"{summary.out.stem}-report"
            try:
                report.render([summary.out], rdir)
                err.print(f"report: {rdir / 'index.html'}")
            except Exception as e:  # noqa: BLE001 - the records are safe; say so rather than a traceback
                err.print(f"[yellow]report not rendered[/] ({type(e).__name__}: {escape(str(e))}); the results "
                          f"are in {summary.out}: try `moebench report {summary.out} -o {rdir}`")
    bad = [r for r in summary.records if r["status"] in STRICT_BAD]
    if strict and bad:
        err.print(f"--strict: {len(bad)} case(s) ended " + ", ".join(sorted({r['status'] for r in bad})) + ": "
                  + "; ".join(f"{r['label']}: {r['reason']}" for r in bad[:5]), markup=False)
        raise typer.Exit(1)


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="results JSONL file(s)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="report directory (default: beside the first "
                                           "file, <its stem>-report/)"),
    paired_paths: Optional[list[Path]] = typer.Option(None, "--paired", "-p", help="a `moebench paired` result "
                                                      "(JSON) to add as a table and plot (repeatable)"),
):
    """Render report.md, a self-contained index.html and PNG plots from results files."""
    from rich.markup import escape

    from moebench import paired as pr
    from moebench import report as rep
    from moebench import results

    paired_results = []
    for p in paired_paths or []:
        try:
            paired_results.append((str(p), pr.load(p)))
        except ValueError as e:
            _fail(f"--paired: {e}")
    loaded = results.read(paths)
    for problem in loaded.problems:
        err.print("[yellow]warning:[/] " + escape(problem), highlight=False, soft_wrap=True)
    if not loaded.records:
        _fail("no usable records in " + ", ".join(map(str, paths)))
    out_dir = out_dir or paths[0].parent / f"{paths[0].stem}-report"
    r = rep.write(loaded, out_dir, [str(p) for p in paths], paired=paired_results)
    err.print(f"{sum(r.counts.values())} record(s), {len(r.plots)} plot(s): {out_dir / 'index.html'}, "
              f"{out_dir / 'report.md'}", markup=False)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="results JSONL: the base run (or the only run, with --baseline)"),
    new: Optional[Path] = typer.Argument(None, help="results JSONL: the new run, matched to the base by case_key"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="compare every backend in BASE against this one"),
    threshold: float = typer.Option(0.05, "--threshold", help="relative change that can count (0.05 = 5%)"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | md | csv | json"),
    only_changes: bool = typer.Option(False, "--only-changes", help="hide the rows whose verdict is `same`"),
):
    """Compare two runs (or backends against one): exit 0 no regression, 1 regression, 2 bad input. A timing
    differs only beyond --threshold AND with non-overlapping 95% intervals; noisy records give `noise`."""
    from moebench import compare as cmp

    raise typer.Exit(cmp.cli(base, new, baseline, threshold, fmt, out, err, only_changes))


@app.command()
def paired(
    suite: Optional[str] = typer.Option(None, "--suite", "-s", help="suite name or path to a .toml"),
    backends: str = typer.Option(..., "--backends", "-b", help="comma-separated; the first is the base the "
                                 "others are compared with (with --from: the one new base, as the table names it, e.g. "
                                 "triton,recompute=100)"),
    match: Optional[list[str]] = typer.Option(None, "--match", "-m", help="keep cases whose label contains this "
                                              "(repeatable: all must match)"),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", "-x", help="drop cases whose label contains "
                                                "this (repeatable)"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu | cuda (default: cuda when available)"),
    exec_: Optional[str] = typer.Option(None, "--exec", "-e", help="eager | compile | graphs: time the groups "
                                        "under these execution modes instead of the suite's"),
    no_wait: bool = typer.Option(False, "--no-wait", help="do not wait for another moebench process timing the "
                                 "same device (the result then says it was busy)"),
    rounds: int = typer.Option(6, "--rounds", "-r", min=2, help="interleaved rounds (one ratio each)"),
    steps: int = typer.Option(5, "--steps", min=1, help="timed steps per case per round"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="write the result (JSON) here"),
    from_path: Optional[Path] = typer.Option(None, "--from", help="no timing: re-base a saved result (JSON) on "
                                             "the backend given by --backends"),
):
    """Time backends on the same model and workload in interleaved rounds, so that each ratio comes from one
    window of clocks, temperature and power state (time only; memory is measured by `run`)."""
    from rich.progress import Progress

    from moebench import paired as pr
    from moebench import registry, runner
    from moebench.suite import SuiteError, load

    names = _csv(backends) or []
    if out_path is not None:
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.open("a").close()
        except OSError as e:
            _fail(f"--out: cannot write {out_path}: {e.strerror or e}")
    if from_path is not None:
        if suite is not None:
            _fail("--from re-bases a saved result: give one backend with --backends and no --suite")
        try:
            saved = pr.load(from_path)
        except ValueError as e:
            _fail(f"--from: {e}")
        try:
            result = pr.rebase(saved, backends.strip())  # one label's backend part: `triton,recompute=100`
        except ValueError as e:
            _fail(f"--backends: {from_path}: {e}")
        _paired_out(result, out_path)
        return
    if suite is None:
        _fail("--suite is required (or --from a saved result)")
    dev = device or runner.default_device()
    if dev not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got '{dev}'")
    if dev == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail("--device cuda: torch.cuda.is_available() is False on this machine")
    try:
        cases = load(suite, device=dev, backends=_backends(backends), execs=_execs(exec_))
    except SuiteError as e:
        _fail(str(e))
    except registry.UnknownName as e:
        _fail(f"{'--backends' if str(e).startswith('unknown backend') else '--suite'}: {e}")
    cases = _select(cases, match, exclude)
    gs = pr.groups(cases, names[0])
    if not gs:
        _fail(f"no model/workload of suite '{suite}' has a case of base backend '{names[0]}' and another one "
              f"after --backends/--match/--exclude ({len(cases)} case(s) left)")
    log = (out_path.with_suffix(".log") if out_path is not None else None)
    with Progress(console=err, transient=True) as progress:
        result = pr.run([c for g in gs for c in g], names[0], rounds, steps, progress, log_path=log,
                        wait=not no_wait)
    _paired_out(result, out_path)


def _paired_out(result: dict, out_path: Optional[Path]):
    """Print a paired result's table; with --out, write its JSON, markdown and plot."""
    import json

    from rich.table import Table

    from moebench import paired as pr

    t = Table(title=f"paired: {result['rounds']} rounds x {result['steps']} steps per case, base "
              f"{pr.base_text(result)}")
    for c in pr.COLUMNS:
        t.add_column(c)
    for row in pr.rows(result):
        t.add_row(*row)
    out.print(t)
    if out_path is not None:
        out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        out_path.with_suffix(".md").write_text(pr.markdown(result))
        png = pr.plot(result)
        if png:
            out_path.with_suffix(".png").write_bytes(png)
        err.print(f"wrote {out_path} and its .md{' and .png' if png else ''}", markup=False)


@app.command()
def trace(
    model: Path = typer.Argument(..., help="a local Hugging Face transformers MoE model directory (nothing "
                                 "is downloaded)"),
    text: Path = typer.Argument(..., help="a text file to run the model over"),
    out_path: Path = typer.Option(..., "--out", "-o", help="the trace to write (.npz; format in "
                                  "moebench/traces.py)"),
    tokens: int = typer.Option(4096, "--tokens", min=1, help="record at most this many tokens of the text"),
    seq: int = typer.Option(1024, "--seq", min=1, help="tokens per forward pass"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer directory (default: the "
                                          "model's)"),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu | cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
):
    """Record a routing trace: the experts a transformers MoE model picks for each token of a text, per layer.
    Replay it with routing = "trace:<path>"."""
    from rich.table import Table

    from moebench import record, traces

    if dtype not in ("float32", "bfloat16", "float16"):
        _fail(f"--dtype must be float32, bfloat16 or float16, got '{dtype}'")
    if device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail("--device cuda: torch.cuda.is_available() is False on this machine")
    try:
        t = record.record(model, text, out_path, tokens=tokens, seq=seq, tokenizer_path=tokenizer,
                          device=device, dtype=dtype)
    except (record.RecordError, traces.TraceError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--out: cannot write {out_path}: {e.strerror or e}")
    L, T, K = t.shape
    tab = Table(title=f"{out_path}: {L} MoE layer(s) x {T} tokens, top-{K} of {t.n_experts} experts"
                f"{', gate weights recorded' if t.p_LTK is not None else ''}")
    for c in ("layer", "router", "max/mean load", "entropy (norm.)", "dead experts"):
        tab.add_column(c, justify="left" if c == "router" else "right")
    for r in record.summary(t):
        tab.add_row(str(r["layer"]), r["module"], f"{r['max_over_mean']:.2f}", f"{r['entropy_norm']:.3f}",
                    str(r["dead"]))
    out.print(tab)


@app.command("list")
def list_(what: str = typer.Argument("all", help="backends | suites | presets | execs | all")):
    """List backends (available here? why not), suites, presets and execution modes."""
    from rich.table import Table

    from moebench import registry, runner
    from moebench.spec import PRESETS
    from moebench.suite import available_suites, describe

    if what not in ("all", "backends", "suites", "presets", "execs"):
        _fail(f"list takes backends, suites, presets, execs or all, not '{what}'")
    dev = runner.default_device()
    if what in ("all", "backends"):
        t = Table(title=f"backends (device here: {dev})")
        for c in ("name", "available", "dropless", "graphs", "weights", "options", "description"):
            t.add_column(c)
        for name, b in registry.all_backends().items():
            dt = "bfloat16" if dev == "cuda" else "float32"
            why = b.why_not(dev, dt)
            sync = b.sync_reason("cuda", "bfloat16")
            t.add_row(name, "[green]yes[/]" if why is None else f"[yellow]no[/]: {escape(why)}", str(b.dropless),
                      "yes" if sync is None else f"no: {escape(sync)}", b.weight_layout,
                      ", ".join(f"{k}={v}" for k, v in b.options.items()), escape(b.description))
        out.print(t)
        for mod, e in registry.load_errors().items():
            out.print(f"[red]could not load {mod}[/]: {e}")
    if what in ("all", "suites"):
        t = Table(title="suites")
        t.add_column("name")
        t.add_column("description")
        for name in available_suites():
            t.add_row(name, describe(name))
        out.print(t)
    if what in ("all", "execs"):
        from moebench.core import EXECS
        t = Table(title="execution modes (workload.exec; `moebench run --exec MODE`)")
        t.add_column("exec")
        t.add_column("what is timed")
        for name, what_ in EXECS.items():
            t.add_row(name, what_)
        out.print(t)
    if what in ("all", "presets"):
        t = Table(title="presets")
        for c in ("name", "D", "F", "E", "K", "layers", "total params", "active params"):
            t.add_column(c, justify="right" if c != "name" else "left")
        for name, p in PRESETS.items():
            q = p.params()
            t.add_row(name, str(p.d_model), str(p.d_expert), str(p.n_experts), str(p.top_k), str(p.n_layers),
                      f"{q['total'] / 1e6:,.1f}M", f"{q['active'] / 1e6:,.1f}M")
        out.print(t)


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
