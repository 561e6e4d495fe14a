"""Shared pieces of the command line: the typer app, consoles, options, and error-to-exit-code mapping.

The `dgrun.cli` package is the only place that prints for humans or exits.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from dgrun.errors import DgrunError, RecipeError, RunError, Terminated

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
app = typer.Typer(
    name="dgrun",
    help="Run diffusion-inference optimization recipes. `dgrun RECIPE.yaml` = `dgrun run RECIPE.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=True)  # a path in a message stays on one line, in a log too
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
        help="Replace the recipe's steps: 'deepcache:interval=2,branch_id=0,compile' (a,b:k=v,...); "
        "'+compile' appends a step, '-vae_tiling' removes one (edits may be combined: '+tf32,-compile').",
    ),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")]


def fail(code: int, lines: list[str] | str) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(escape(line))
    raise typer.Exit(code)


def report_problems(error: RecipeError, what: str = "nothing was run") -> NoReturn:
    files = sorted({p.position.file for p in error.problems})
    for problem in error.problems:
        err.print(escape(str(problem)), style="red")
    count = len(error.problems)
    fail(EXIT_BAD_INPUT, f"{count} problem{'s' if count != 1 else ''} in {', '.join(files)}; {what}")


def guard(debug: bool, action: Any) -> Any:
    """Run `action`, turning dgrun's errors into messages and exit codes."""
    try:
        return action()
    except RecipeError as exc:
        report_problems(exc)
    except RunError as exc:
        if debug:
            traceback.print_exc()
        fail(
            EXIT_RUN_FAILED,
            [f"run failed: {line}" if i == 0 else line for i, line in enumerate(str(exc).splitlines())],
        )
    except DgrunError as exc:
        fail(EXIT_BAD_INPUT, f"error: {exc}")
    except Terminated:
        fail(
            EXIT_TERMINATED,
            "terminated (SIGTERM); finished images and run.json are kept, `--resume` continues",
        )
    except KeyboardInterrupt:
        fail(
            EXIT_INTERRUPTED,
            "interrupted (Ctrl-C); finished images and run.json are kept, `--resume` continues",
        )
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
        fail(
            EXIT_RUN_FAILED,
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
        )


def load_recipe_args(recipe: Path, sets: list[str] | None, optimize: str | None, registry: Any) -> Any:
    """Load a recipe with the flags applied; on bad input every problem of the file, steps included."""
    from dgrun.checking import load_checked

    return load_checked(recipe, sets or [], optimize, registry)


def warn_broken_plugins(registry: Any) -> None:
    for plugin in registry.failed():
        err.print(
            f"[yellow]warning: plugin {escape(plugin.distribution)} ({plugin.name}) "
            f"{escape(plugin.error or '')}[/yellow]"
        )
    if registry.filter_note and "no installed plugin" in registry.filter_note:
        err.print(f"[yellow]warning: {escape(registry.filter_note)}[/yellow]")


def wide_console() -> Console:
    """A console for wide tables: rich assumes 80 columns off a terminal, which cuts them unreadably."""
    return out if out.is_terminal else Console(highlight=False, width=max(out.width, 200))
