"""The `dgrun` command line (DESIGN §4) — the only module that prints for humans or exits.

Exit codes: 0 ok · 1 a run failed · 2 bad input (recipe, flags, paths) · 130 interrupted.
torch is never imported by `--help`, `check`, `steps`, `plugins` or `schema`.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dgrun import __version__
from dgrun.errors import DgrunError, RecipeError, RunError

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("run", "check", "steps", "plugins", "schema")

app = typer.Typer(
    name="dgrun",
    help="Run diffusion-inference optimization recipes. `dgrun RECIPE.yaml` = `dgrun run RECIPE.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="KEY.PATH=VALUE", help="Override a recipe value, e.g. generate.steps=4."
    ),
]
OptimizeOption = Annotated[
    str | None,
    typer.Option(
        "--optimize",
        "-O",
        metavar="STEPS",
        help="Replace the recipe's steps: 'deepcache:interval=2,branch_id=0,compile' (a,b:k=v,...).",
    ),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")]


def _fail(code: int, lines: list[str] | str) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(escape(line))
    raise typer.Exit(code)


def _report_problems(error: RecipeError, what: str = "nothing was run") -> NoReturn:
    files = sorted({p.position.file for p in error.problems})
    for problem in error.problems:
        err.print(escape(str(problem)), style="red")
    count = len(error.problems)
    _fail(EXIT_BAD_INPUT, f"{count} problem{'s' if count != 1 else ''} in {', '.join(files)}; {what}")


def _guard(debug: bool, action: Any) -> Any:
    """Run `action`, turning dgrun's errors into messages and exit codes."""
    try:
        return action()
    except RecipeError as exc:
        _report_problems(exc)
    except RunError as exc:
        if debug:
            traceback.print_exc()
        _fail(
            EXIT_RUN_FAILED,
            [f"run failed: {line}" if i == 0 else line for i, line in enumerate(str(exc).splitlines())],
        )
    except DgrunError as exc:
        _fail(EXIT_BAD_INPUT, f"error: {exc}")
    except KeyboardInterrupt:
        _fail(
            EXIT_INTERRUPTED,
            "interrupted (Ctrl-C); finished images and run.json are kept, `--resume` continues",
        )
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _fail(
            EXIT_RUN_FAILED,
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
        )


def _load(recipe: Path, sets: list[str] | None, optimize: str | None) -> Any:
    from dgrun.loading import load_recipe

    return load_recipe(recipe, sets or [], optimize)


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


def _wide() -> Console:
    """A console for wide tables: rich assumes 80 columns off a terminal, which cuts them unreadably."""
    return out if out.is_terminal else Console(highlight=False, width=max(out.width, 200))


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
    seconds = sorted(i["seconds"] for i in record["images"])
    median = seconds[len(seconds) // 2] if seconds else 0.0
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

    loaded = _guard(debug, lambda: _load(recipe, set_, optimize))
    registry = _guard(debug, build_registry)
    _warn_broken_plugins(registry)
    if dry_run:
        _guard(debug, lambda: _print_plan(loaded, registry, explain=True))
        return
    from dgrun.runner import Run, RunOptions

    options = RunOptions(out_dir, overwrite, resume, trust_remote_code, argv=sys.argv[1:])
    observer = RichObserver()
    runner = _guard(debug, lambda: Run(loaded, registry, options, observer))
    out.print(f"[bold]{escape(loaded.recipe.name)}[/bold] → {escape(str(runner.out_dir))}")

    def execute() -> dict[str, Any]:
        try:
            return runner.execute()
        finally:
            observer.close()

    record = _guard(debug, execute)
    _summary(record, runner.out_dir)


def _warn_broken_plugins(registry: Any) -> None:
    for plugin in registry.failed():
        err.print(
            f"[yellow]warning: plugin {escape(plugin.distribution)} ({plugin.name}) "
            f"{escape(plugin.error or '')}[/yellow]"
        )


def _print_plan(loaded: Any, registry: Any, explain: bool) -> list[Any]:
    """Plan without importing torch; print the outlook of each step. Returns the plan's steps."""
    from dgrun.models import static_model_info
    from dgrun.optimizer import Environment
    from dgrun.planner import make_plan

    registry.check_consistent()
    recipe = loaded.recipe
    env = Environment.guess(recipe.model.device)
    kind, label = static_model_info(recipe.model.id, loaded.path.parent)
    plan = make_plan(
        recipe.optimize,
        registry,
        env,
        loaded.source,
        recipe.on_unavailable,
        model_kind=kind,
        model_label=label,
    )
    kind_text = kind.value if kind else "known when loaded"
    out.print(
        f"[green]ok[/green] {escape(str(loaded.path))}: {escape(recipe.name)} · {escape(label)} · "
        f"{kind_text} · device {env.device}"
    )
    for step in plan.ordered() if explain else plan.steps:
        if explain or step.reason:
            colour = "green" if step.runnable else ("yellow" if step.on_unavailable == "skip" else "red")
            out.print(
                f"  [{colour}]{step.name}[/{colour}] [dim]{step.stage.value}[/dim] {escape(step.outlook())}"
            )
    for index, variant in enumerate(recipe.variants):
        if variant.optimize is not None:
            make_plan(
                variant.optimize,
                registry,
                env,
                loaded.source,
                variant.on_unavailable or recipe.on_unavailable,
                prefix=("variants", index, "optimize"),
                model_kind=kind,
                model_label=label,
            )
    return plan.steps


@app.command()
def check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
    set_: SetOption = None,
    optimize: OptimizeOption = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print the plan the runner would execute here.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Validate recipes and plan their steps without loading a model (or torch). Exit 2 if any is invalid."""
    from dgrun.plugins import build_registry

    registry = _guard(debug, build_registry)
    _warn_broken_plugins(registry)
    problems = []
    for recipe in recipes:
        try:
            loaded = _load(recipe, set_, optimize)
            _print_plan(loaded, registry, explain)
        except RecipeError as exc:
            problems.extend(exc.problems)
        except DgrunError as exc:
            _fail(EXIT_BAD_INPUT, f"error: {exc}")
    if problems:
        _report_problems(RecipeError(problems), "fix them and check again")


@app.command()
def steps() -> None:
    """Every installed optimization step: stage, providing package, and whether it can run here."""
    from dgrun.optimizer import Environment
    from dgrun.plugins import build_registry

    registry = build_registry()
    _warn_broken_plugins(registry)
    env = Environment.guess()
    table = Table()
    for column in ("step", "stage", "applies to", "package"):
        table.add_column(column, no_wrap=True)
    table.add_column("available here")
    table.add_column("summary")
    for name, info in sorted(registry.optimizers.items()):
        reason = info.cls.unavailable_reason(env)
        kinds = "any" if len(info.cls.applies_to) > 1 else next(iter(info.cls.applies_to)).value
        available = "[green]yes[/green]" if reason is None else f"[yellow]no[/yellow] ({escape(reason)})"
        table.add_row(
            name, info.cls.stage.value, kinds, escape(info.package), available, escape(info.cls.summary)
        )
    _wide().print(table)
    for clash in registry.clashes:
        err.print(f"[red]{escape(clash)}[/red]")


@app.command()
def plugins() -> None:
    """Installed plugin packages, their versions and the steps each provides."""
    from dgrun.plugins import build_registry

    registry = build_registry()
    table = Table()
    for column in ("plugin", "distribution", "version", "steps", "status"):
        table.add_column(column)
    for plugin in registry.plugins:
        status = "[green]ok[/green]" if plugin.error is None else f"[red]{escape(plugin.error)}[/red]"
        table.add_row(plugin.name, plugin.distribution, plugin.version, ", ".join(plugin.optimizers), status)
    _wide().print(table)
    for clash in registry.clashes:
        err.print(f"[red]{escape(clash)}[/red]")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the recipe format (for editors and CI validation)."""
    from dgrun.recipe import Recipe

    document = Recipe.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "dgrun recipe (format 1)"
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"dgrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """dgrun: diffusion-inference optimization as version-controlled, reproducible experiments."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `dgrun RECIPE ...` is shorthand for `dgrun run RECIPE ...`."""
    # Ctrl-C must stop a run even when the launcher (a script's `&`, some CI runners) ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and args and not args[0].startswith("--version"):
        args.insert(0, "run")
    app(args=args, prog_name="dgrun")
