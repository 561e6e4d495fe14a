"""Commands that look without running: `check`, `steps`, `plugins`, `schema`. None imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dgrun.cli.common import (
    EXIT_BAD_INPUT,
    DebugOption,
    OptimizeOption,
    SetOption,
    app,
    err,
    fail,
    guard,
    load_recipe_args,
    out,
    report_problems,
    warn_broken_plugins,
    wide_console,
)
from dgrun.errors import DgrunError, RecipeError


def print_plan(loaded: Any, registry: Any, explain: bool) -> list[Any]:
    """Plan without importing torch; print the outlook of each step. Returns the plan's steps."""
    from dgrun.optimizer import Environment
    from dgrun.planner import plan_recipe

    registry.check_consistent()
    recipe = loaded.recipe
    env = Environment.guess(recipe.model.device)
    plan = plan_recipe(loaded, registry, env)
    kind_text = plan.model_kind.value if plan.model_kind else "kind known when loaded"
    out.print(
        f"[green]ok[/green] {escape(str(loaded.path))}: {escape(recipe.name)} · {escape(plan.model_label)} · "
        f"{kind_text} · device {env.device}"
    )
    for step in plan.ordered() if explain else plan.steps:
        if explain or step.reason:
            colour = "green" if step.runnable else ("yellow" if step.on_unavailable == "skip" else "red")
            out.print(
                f"  [{colour}]{step.name}[/{colour}] [dim]{step.stage.value}[/dim] {escape(step.outlook())}"
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

    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    problems = []
    for recipe in recipes:
        try:
            loaded = load_recipe_args(recipe, set_, optimize, registry)
            print_plan(loaded, registry, explain)
        except RecipeError as exc:
            problems.extend(exc.problems)
        except DgrunError as exc:
            fail(EXIT_BAD_INPUT, f"error: {exc}")
    if problems:
        report_problems(RecipeError(problems), "fix them and check again")


@app.command()
def steps() -> None:
    """Every installed optimization step: stage, providing package, and whether it can run here."""
    from dgrun.optimizer import Environment
    from dgrun.plugins import build_registry

    registry = build_registry()
    warn_broken_plugins(registry)
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
    wide_console().print(table)
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
    wide_console().print(table)
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
