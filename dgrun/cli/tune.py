"""`dgrun tune`: search the recipe's `tune:` space, with a live table of the trials and the best so far."""

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
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    EXIT_TERMINATED,
    DebugOption,
    SetOption,
    app,
    fail,
    guard,
    load_recipe_args,
    out,
    warn_broken_plugins,
    wide_console,
)
from dgrun.errors import Terminated

SHOWN = ("trial", "status", "steps", "generate", "s/img", "speedup", "PSNR min", "adherence", "why")


class LiveTrials:
    """The tune observer of the CLI: one row per trial, the best marked, redrawn as trials finish."""

    def __init__(self) -> None:
        self.trials: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.activity = ""
        self.live: Any = None

    @contextlib.contextmanager
    def start(self) -> Iterator[None]:
        from rich.live import Live

        console = wide_console()
        self.live = Live(self.render(), console=console, refresh_per_second=4, transient=False)
        try:
            with self.live:
                yield
        finally:
            if not console.is_terminal:
                console.line()

    def render(self) -> Table:
        from dgrun.tune.report import row

        title = "dgrun tune" + (f" · {self.activity}" if self.activity else "")
        table = Table(title=title, title_justify="left")
        for column in SHOWN:
            table.add_column(column, overflow="fold")
        colours = {
            "feasible": "green",
            "infeasible": "red",
            "rejected": "dim",
            "pruned": "yellow",
            "failed": "red",
        }
        for trial in self.trials[-40:]:
            cells = row(trial)
            colour = colours.get(trial.get("status", ""), "white")
            marker = " ★" if self.best is not None and trial.get("number") == self.best.get("number") else ""
            table.add_row(*(escape(cells[c] + (marker if c == "trial" else "")) for c in SHOWN), style=colour)
        return table

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def trial_done(self, trial: dict[str, Any], best: dict[str, Any] | None) -> None:
        self.trials.append(trial)
        self.best = best
        self.refresh()

    # BenchObserver, for the trial running now
    def stage(self, message: str) -> None:
        self.activity = message
        self.refresh()

    def variant_started(self, result: dict[str, Any]) -> None:
        self.stage(f"{result['name']}: loading")

    def variant_done(self, result: dict[str, Any]) -> None: ...

    def pipeline_ready(self, result: dict[str, Any], pipe: Any) -> None:
        self.stage(f"{result['name']}: scoring")

    def warning(self, message: str) -> None: ...

    def step_done(self, step: Any) -> None: ...

    def generation_started(self, total: int, already_done: int) -> None: ...

    def image_done(self, image: dict[str, Any]) -> None: ...


@app.command()
def tune(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe YAML file with a `tune:` section.", show_default=False)
    ],
    trials: Annotated[
        int | None, typer.Option("--trials", min=1, help="Trials to run (default: tune.trials).")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Output directory (default: output.dir + '-tune').")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in --out.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over, replacing the study in --out.")
    ] = False,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed passes per trial.")] = 2,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed passes per trial before timing.")
    ] = 1,
    set_: SetOption = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model.trust_remote_code: true to take effect.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Search the recipe's `tune:` space (Optuna, study in OUT/study.db) for the fastest recipe that meets
    its constraints; write OUT/NAME.tuned.yaml and report.html/.md/.json. Exit 1 when no trial is feasible.

    Combinations the planner refuses cost no trial; a trial already slower than the best is stopped early.
    Ctrl-C keeps the study: `--resume` continues it."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        fail(EXIT_BAD_INPUT, "error: dgrun tune needs Optuna: pip install 'dgrun[tune]'")
    if resume and overwrite:
        fail(EXIT_BAD_INPUT, "error: --resume and --overwrite exclude each other")
    from dgrun.machine import WAIT_SAMPLE_SECONDS, choose_wait_policy
    from dgrun.plugins import build_registry

    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    loaded = guard(debug, lambda: load_recipe_args(recipe, set_, None, registry))
    from dgrun.tune.search import TuneOptions, Tuner

    options = TuneOptions(
        trials,
        out_dir,
        resume,
        overwrite,
        repeats,
        warmup,
        trust_remote_code,
        sys.argv[1:],
        choose_wait_policy(WAIT_SAMPLE_SECONDS),
    )
    live = LiveTrials()
    tuner = guard(debug, lambda: Tuner(loaded, registry, options, live))
    out.print(f"[bold]{escape(loaded.recipe.name)}[/bold] tune → {escape(str(tuner.out_dir))}")

    def execute() -> dict[str, Any]:
        try:
            with live.start():
                return tuner.execute()
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            fail(
                EXIT_TERMINATED if terminated else EXIT_INTERRUPTED,
                f"{'terminated' if terminated else 'interrupted'}; the study is kept: "
                f"`dgrun tune {recipe} --resume{' --out ' + str(out_dir) if out_dir else ''}` continues it",
            )

    report = guard(debug, execute)
    out.print(f"reports: {escape(str(tuner.out_dir))}/report.html · report.md · report.json")
    if report.get("best") is None:
        out.print("[red]no trial met every constraint[/red]; the report lists the nearest misses")
        raise typer.Exit(EXIT_RUN_FAILED)
    best = report["best"]
    out.print(
        f"[green]best[/green]: trial {best['number']}, {report['objective']} {best['objective']:.4g} · "
        f"tuned recipe {escape(report['tuned_recipe'])}"
    )
