"""`dgrun bench` (a live comparison table, then three reports) and `dgrun reproduce` (re-run and compare)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dgrun.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    EXIT_TERMINATED,
    DebugOption,
    OptimizeOption,
    SetOption,
    app,
    err,
    fail,
    guard,
    load_recipe_args,
    out,
    warn_broken_plugins,
    wide_console,
)
from dgrun.errors import Terminated
from dgrun.machine import WAIT_SAMPLE_SECONDS, choose_wait_policy

TrustOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model.trust_remote_code: true to take effect.")
]


class LiveTable:
    """The bench observer of the CLI: one table row per variant, redrawn as results come in."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.activity: dict[str, str] = {}
        self.current: str | None = None
        self.live: Any = None

    @contextlib.contextmanager
    def start(self) -> Iterator[None]:
        """Show the table while the block runs; off a terminal it is printed once, at the end."""
        from rich.live import Live

        console = wide_console()
        self.live = Live(self.render(), console=console, refresh_per_second=4, transient=False)
        try:
            with self.live:
                yield
        finally:
            if not console.is_terminal:
                console.line()  # rich leaves the last table line unterminated off a terminal

    def render(self) -> Table:
        from dgrun.report_table import columns, row

        table = Table(title="dgrun bench", title_justify="left")
        shown = columns(self.results)
        for column in shown:
            table.add_column(
                column, no_wrap=True, justify="left" if column in ("variant", "status") else "right"
            )
        colours = {"complete": "green", "running": "cyan", "failed": "red", "unavailable": "yellow"}
        for result in self.results:
            cells = row(result)
            status = result["status"]
            if status == "running" and self.activity.get(result["name"]):
                status = f"running: {self.activity[result['name']]}"
            colour = colours.get(result["status"], "dim")
            cells["status"] = f"[{colour}]{escape(status)}[/{colour}]"
            table.add_row(*(cells[c] if c == "status" else escape(cells[c]) for c in shown))
        return table

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    # BenchObserver (duck-typed: importing dgrun.bench here would import torch for `--help`)
    def variant_started(self, result: dict[str, Any]) -> None:
        self.current = result["name"]
        self.refresh()

    def variant_done(self, result: dict[str, Any]) -> None:
        self.current = None
        self.refresh()

    def pipeline_ready(self, result: dict[str, Any], pipe: Any) -> None:
        self.activity[result["name"]] = "scoring"
        self.refresh()

    def stage(self, message: str) -> None:
        if self.current:
            self.activity[self.current] = message
            self.refresh()

    def warning(self, message: str) -> None:
        (self.live.console if self.live is not None else out).print(f"[yellow]! {escape(message)}[/yellow]")

    def step_done(self, step: Any) -> None:
        if self.current:
            self.activity[self.current] = f"{step.name} {step.status}"
            self.refresh()

    def generation_started(self, total: int, already_done: int) -> None:
        self.stage(f"generating {total} images")

    def image_done(self, image: dict[str, Any]) -> None: ...


@app.command()
def bench(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed passes over all prompts.")] = 3,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed passes after the recorded one, before timing.")
    ] = 1,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Report directory (default: output.dir + '-bench').")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a bench of a different recipe in --out.")
    ] = False,
    set_: SetOption = None,
    optimize: OptimizeOption = None,
    trust_remote_code: TrustOption = False,
    debug: DebugOption = False,
) -> None:
    """Baseline (no steps), the recipe, and every variant (sweeps expanded): speed, memory, fidelity."""
    from dgrun.plugins import build_registry

    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    loaded = guard(debug, lambda: load_recipe_args(recipe, set_, optimize, registry))
    from dgrun.bench import Bench, BenchOptions

    options = BenchOptions(
        repeats,
        warmup,
        out_dir,
        overwrite,
        trust_remote_code,
        argv=sys.argv[1:],
        wait_policy=choose_wait_policy(WAIT_SAMPLE_SECONDS),
    )
    live = LiveTable()
    runner = guard(debug, lambda: Bench(loaded, registry, options, live))
    guard(debug, runner.prepare)
    live.results = [entry.result for entry in runner.entries]
    out.print(f"[bold]{escape(loaded.recipe.name)}[/bold] bench → {escape(str(runner.out_dir))}")

    def execute() -> dict[str, Any]:
        try:
            with live.start():
                try:
                    report = runner.execute()
                finally:
                    live.refresh()  # the final statuses (e.g. "not run" after Ctrl-C)
            return report
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            fail(
                EXIT_TERMINATED if terminated else EXIT_INTERRUPTED,
                f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}; the finished variants "
                f"are in the partial report {runner.out_dir}/report.html",
            )

    report = guard(debug, execute)
    for result in report["variants"]:
        if result.get("error"):
            err.print(f"[red]{escape(result['name'])}: {result['status']}[/red]: {escape(result['error'])}")
    out.print(f"reports: {escape(str(runner.out_dir))}/report.html · report.md · report.json")
    if report["status"] != "complete":
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command()
def reproduce(
    source: Annotated[
        Path, typer.Argument(help="A run.json, or a PNG written by dgrun.", show_default=False)
    ],
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", metavar="PSNR", help="Accept images at least this close (PSNR in dB)."),
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="New directory for the re-run (default: output.dir-reproduce)."),
    ] = None,
    trust_remote_code: TrustOption = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for the re-run (default: the recorded count)."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Re-run a recorded experiment and compare its images; exit 0 if they match, 1 on drift.

    From a PNG only the call that made that image runs again. The recorded CPU thread count is used again
    (CPU images depend on it); on drift the runtime facts that differ are listed with the versions."""
    from dgrun.cli.run import RichObserver
    from dgrun.plugins import build_registry
    from dgrun.reproduce import read_origin
    from dgrun.reproduce import reproduce as run_reproduction

    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    origin = guard(debug, lambda: read_origin(source))
    policy = choose_wait_policy(WAIT_SAMPLE_SECONDS)
    count = len(origin.targets)
    out.print(
        f"reproducing [bold]{escape(str(origin.recipe.get('name')))}[/bold] from {escape(str(source))} "
        f"({count} image{'s' if count != 1 else ''} to compare)"
    )
    observer = RichObserver()

    def execute() -> Any:
        try:
            return run_reproduction(
                source,
                registry,
                out_dir,
                tolerance,
                trust_remote_code,
                sys.argv[1:],
                observer,
                threads=threads,
                wait_policy=policy,
            )
        finally:
            observer.close()

    result = guard(debug, execute)
    _print_reproduction(result, tolerance)
    if not result.reproduced:
        raise typer.Exit(EXIT_RUN_FAILED)


def _print_reproduction(result: Any, tolerance: float | None) -> None:
    table = Table(title="images", title_justify="left")
    for column in ("recorded", "result", "max abs diff", "PSNR dB", "detail"):
        table.add_column(column)
    colours = {"identical": "green", "same pixels": "green", "within tolerance": "yellow"}
    for check in result.images:
        colour = colours.get(check.status, "red")
        psnr = (
            "∞"
            if check.status in ("identical", "same pixels")
            else (f"{check.psnr_db:.2f}" if check.psnr_db is not None else "–")
        )
        diff = "–" if check.max_abs_diff is None else str(check.max_abs_diff)
        table.add_row(
            escape(check.file), f"[{colour}]{check.status}[/{colour}]", diff, psnr, escape(check.detail)
        )
    wide_console().print(table)
    if result.version_changes:
        out.print("versions that differ from the record:")
        for name, recorded, current in result.version_changes:
            out.print(f"  {escape(name)}: {escape(recorded)} → {escape(current)}")
    else:
        out.print("versions: same as recorded")
    if result.runtime_changes:
        out.print("runtime that differs from the record:")
        for change in result.runtime_changes:
            out.print(f"  {escape(change)}")
    elif not result.reproduced:
        out.print("runtime: same as recorded")
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    passed = sum(check.passed for check in result.images)
    total = len(result.images)
    where = f"new run in {escape(str(result.out_dir))}"
    if not result.images:
        err.print(f"[red]nothing to compare[/red]: the record lists no finished images · {where}")
    elif result.reproduced:
        out.print(f"[green]reproduced[/green]: {passed} of {total} images match · {where}")
    else:
        limit = f" (tolerance {tolerance} dB)" if tolerance is not None else ""
        err.print(f"[red]drift[/red]: {total - passed} of {total} images differ{limit} · {where}")
