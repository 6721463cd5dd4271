"""The `moebench` command: run | paired | list | report | compare. Bad input exits 2 with one clear message."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark Mixture-of-Experts implementations on one shared model spec.")
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)


def _fail(msg: str, code: int = 2):  # the message echoes user input: "[/]" in it is text, not markup
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _csv(s: Optional[str]) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


@app.command()
def run(
    suite: Optional[str] = typer.Option(None, "--suite", "-s", help="suite name or path to a .toml (default: l4 on a GPU, ci on a CPU)"),
    backends: Optional[str] = typer.Option(None, "--backends", "-b", help="comma-separated subset of the suite's backends"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu | cuda (default: cuda when available)"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="results JSONL (appended); default results/<suite>-<run id>.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="skip cases already recorded in --out"),
    worker: str = typer.Option("auto", "--worker", help="auto | per-case | reuse: worker process per case, or reused"),
    list_cases: bool = typer.Option(False, "--list-cases", help="print the expanded cases and exit"),
    no_report: bool = typer.Option(False, "--no-report", help="do not render the report after the run"),
    nproc: int = typer.Option(1, "--nproc", help="processes per case (expert parallel suites)", min=1),
    profile: Optional[Path] = typer.Option(None, "--profile", help="after timing each case, profile 3 steps "
                                           "with torch.profiler and write the top ops to DIR/<case_key>.txt"),
):
    """Run a suite: one record per case, appended to the results file as each case ends."""
    from moebench import registry, runner
    from moebench.suite import SuiteError, load

    dev = device or runner.default_device()
    if dev not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got '{dev}'")
    if worker not in ("auto", "per-case", "reuse"):
        _fail(f"--worker must be auto, per-case or reuse, got '{worker}'")
    suite = suite or ("l4" if dev == "cuda" else "ci")
    try:
        cases = load(suite, device=dev, backends=_csv(backends))
    except SuiteError as e:
        _fail(str(e))
    except registry.UnknownName as e:  # from the command line, not the file: name the option
        _fail(f"{'--backends' if str(e).startswith('unknown backend') else '--suite'}: {e}")
    if not cases:
        _fail(f"--backends: suite '{suite}' has no case for backend(s) {backends}")
    if list_cases:
        for c in cases:
            out.print(f"{c.key}  {c.label}", highlight=False)
        raise typer.Exit(0)
    if profile is not None:
        import os
        os.environ["MOEBENCH_PROFILE_DIR"] = str(profile.resolve())  # inherited by the worker processes
    run_id = runner.new_run_id()
    path = out_path or Path("results") / f"{Path(suite).stem}-{run_id}.jsonl"
    if nproc > 1 or any(c.workload.world_size > 1 or registry.get(c.backend).needs_process_group for c in cases):
        from moebench import distributed  # torchrun workers; a case on fewer ranks than --nproc uses the first ones
        try:
            summary = distributed.run(cases, path, nproc=nproc, resume=resume, run_id=run_id, console=err)
        except OSError as e:
            _fail(str(e))
    else:
        reuse = None if worker == "auto" else worker == "reuse"
        try:
            summary = runner.run(cases, path, resume=resume, run_id=run_id, reuse_worker=reuse, console=err)
        except OSError as e:
            _fail(str(e))
    if summary.records:
        out.print(runner.summary_table(summary.records))
    done = len(summary.records)
    err.print(f"{done} case(s) recorded in {summary.out}"
              + (f"; {summary.skipped_done} already done (--resume)" if summary.skipped_done else ""),
              markup=False)
    if summary.interrupted:
        err.print("[yellow]interrupted[/]: " + escape(f"finished records are safe in {summary.out}; "
                  f"continue with: moebench run --suite {suite} --out {summary.out} --resume"))
        raise typer.Exit(130)
    if not no_report and summary.records:
        try:
            from moebench import report
        except ImportError:
            report = None
        if report is not None:
            rdir = Path("reports") / summary.out.stem
            try:
                report.render([summary.out], rdir)
                err.print(f"report: {rdir / 'index.html'}")
            except Exception as e:  # noqa: BLE001 - the records are safe; say so rather than a traceback
                err.print(f"[yellow]report not rendered[/] ({type(e).__name__}: {escape(str(e))}); the results "
                          f"are in {summary.out}: try `moebench report {summary.out} -o {rdir}`")


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="results JSONL file(s)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="report directory (default reports/<first file's stem>)"),
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
    out_dir = out_dir or Path("reports") / paths[0].stem
    r = rep.write(loaded, out_dir, [str(p) for p in paths], paired=paired_results)
    err.print(f"{sum(r.counts.values())} record(s), {len(r.plots)} plot(s): {out_dir / 'index.html'}, "
              f"{out_dir / 'report.md'}", markup=False)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="results JSONL: the base run (or the only run, with --baseline)"),
    new: Optional[Path] = typer.Argument(None, help="results JSONL: the new run, matched to the base by case_key"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="compare every backend in BASE against this one"),
    threshold: float = typer.Option(0.05, "--threshold", help="relative change that can count (0.05 = 5%)"),
    alpha: float = typer.Option(0.01, "--alpha", help="Mann-Whitney U p-value below which step times differ"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | md | csv | json"),
):
    """Compare two runs (or backends against one): exit 0 no regression, 1 regression, 2 bad input."""
    from moebench import compare as cmp

    raise typer.Exit(cmp.cli(base, new, baseline, threshold, alpha, fmt, out, err))


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
        cases = load(suite, device=dev, backends=names)
    except SuiteError as e:
        _fail(str(e))
    except registry.UnknownName as e:
        _fail(f"{'--backends' if str(e).startswith('unknown backend') else '--suite'}: {e}")
    cases = [c for c in cases if all(m in c.label for m in match or []) and not any(x in c.label for x in exclude or [])]
    gs = pr.groups(cases, names[0])
    if not gs:
        _fail(f"no model/workload of suite '{suite}' has a case of base backend '{names[0]}' and another one "
              f"after --backends/--match/--exclude ({len(cases)} case(s) left)")
    with Progress(console=err, transient=True) as progress:
        result = pr.run([c for g in gs for c in g], names[0], rounds, steps, progress)
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


@app.command("list")
def list_(what: str = typer.Argument("all", help="backends | suites | presets | all")):
    """List backends (available here? why not), suites and presets."""
    from rich.table import Table

    from moebench import registry, runner
    from moebench.spec import PRESETS
    from moebench.suite import available_suites, describe

    if what not in ("all", "backends", "suites", "presets"):
        _fail(f"list takes backends, suites, presets or all, not '{what}'")
    dev = runner.default_device()
    if what in ("all", "backends"):
        t = Table(title=f"backends (device here: {dev})")
        for c in ("name", "available", "dropless", "weights", "options", "description"):
            t.add_column(c)
        for name, b in registry.all_backends().items():
            why = b.why_not(dev, "bfloat16" if dev == "cuda" else "float32")
            t.add_row(name, "[green]yes[/]" if why is None else f"[yellow]no[/]: {why}", str(b.dropless),
                      b.weight_layout, ", ".join(f"{k}={v}" for k, v in b.options.items()), b.description)
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
