"""`dgrun run` (and `dgrun RECIPE`): rich progress while a recipe runs, and a closing summary."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dgrun.cli.common import (
    DebugOption,
    OptimizeOption,
    SetOption,
    app,
    guard,
    load_recipe_args,
    out,
    warn_broken_plugins,
)
from dgrun.cli.inspection import print_plan
from dgrun.machine import WAIT_SAMPLE_SECONDS, choose_wait_policy


class RichObserver:
    """Shows a run as it happens: one line per stage and step, a progress bar over images."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=out,
            transient=False,
        )
        self.task: Any = None

    def stage(self, message: str) -> None:
        out.print(f"[dim]·[/dim] {escape(message)}")

    def warning(self, message: str) -> None:
        out.print(f"[yellow]! {escape(message)}[/yellow]")

    def step_done(self, step: Any) -> None:
        mark = {"applied": "[green]✓[/green]", "fell back": "[yellow]↪[/yellow]"}.get(
            step.status, "[dim]–[/dim]"
        )
        detail = f" [dim]({escape(step.detail)})[/dim]" if step.detail else ""
        out.print(f"{mark} {step.name} {step.status}{detail}")

    def generation_started(self, total: int, already_done: int) -> None:
        if already_done:
            out.print(f"[dim]·[/dim] resuming: {already_done} of {total} images already done")
        self.progress.start()
        self.task = self.progress.add_task("", total=total, completed=already_done)

    def image_done(self, image: dict[str, Any]) -> None:
        self.progress.update(self.task, advance=1, description=f"{image['file']} {image['seconds']:.2f}s")

    def close(self) -> None:
        self.progress.stop()


def _summary(record: dict[str, Any], out_dir: Path) -> None:
    steps = Table(title="optimization steps", title_justify="left")
    for column in ("step", "status", "detail", "seconds"):
        steps.add_column(column)
    for step in record["plan"]:
        seconds = f"{step['seconds']:.3f}" if step["seconds"] is not None else ""
        steps.add_row(step["step"], step["status"], escape(step["detail"] or ""), seconds)
    if record["plan"]:
        out.print(steps)
    images = Table(title="images", title_justify="left")
    for column in ("file", "seed", "seconds"):
        images.add_column(column)
    shown = record["images"][:20]
    for image in shown:
        images.add_row(escape(image["file"]), str(image["seed"]), f"{image['seconds']:.3f}")
    if len(record["images"]) > len(shown):
        images.add_row(f"… {len(record['images']) - len(shown)} more", "", "")
    out.print(images)
    timings = record["timings"]
    seconds = [i["seconds"] for i in record["images"]]
    median = statistics.median(seconds) if seconds else 0.0
    out.print(
        f"load {timings['load_seconds']:.2f}s · apply {timings['apply_seconds']:.2f}s · "
        f"warmup {timings['warmup_seconds']:.2f}s · median {median:.3f}s/image · "
        f"{len(record['images'])} images in [bold]{escape(str(out_dir))}[/bold]"
    )


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    set_: SetOption = None,
    optimize: OptimizeOption = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Output directory (default: output.dir).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace another recipe's run in the directory.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep finished images of an interrupted run.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and show the plan; load nothing.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model.trust_remote_code: true to take effect.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Run a recipe: load the model, apply the steps in order, generate and record every image."""
    from dgrun.plugins import build_registry

    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    loaded = guard(debug, lambda: load_recipe_args(recipe, set_, optimize, registry))
    if dry_run:
        guard(debug, lambda: print_plan(loaded, registry, explain=True))
        return
    from dgrun.distributed import launch_rank
    from dgrun.runner import Run, RunObserver, RunOptions

    policy = choose_wait_policy(WAIT_SAMPLE_SECONDS)  # before torch loads
    options = RunOptions(out_dir, overwrite, resume, trust_remote_code, argv=sys.argv[1:], wait_policy=policy)
    # Under torchrun / accelerate launch only rank 0 shows progress; the other ranks work silently.
    main_rank = launch_rank() == 0
    observer = RichObserver() if main_rank else RunObserver()
    runner = guard(debug, lambda: Run(loaded, registry, options, observer))
    if main_rank:
        out.print(f"[bold]{escape(loaded.recipe.name)}[/bold] → {escape(str(runner.out_dir))}")

    def execute() -> dict[str, Any]:
        try:
            return runner.execute()
        finally:
            if isinstance(observer, RichObserver):
                observer.close()

    record = guard(debug, execute)
    if main_rank:
        _summary(record, runner.out_dir)
