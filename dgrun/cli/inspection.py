"""Commands that look without running: `check`, `steps`, `plugins`, `schema`. None imports torch."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dgrun.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_RUN_FAILED,
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
def steps(
    name: Annotated[
        str | None, typer.Argument(help="A step name: show its parameters and rules.", show_default=False)
    ] = None,
) -> None:
    """Every installed optimization step: stage, providing package, and whether it can run here.

    With a NAME: that step's summary, stage, rules, requirements and every parameter (type, default, range,
    description)."""
    from dgrun.optimizer import Environment
    from dgrun.plugins import build_registry

    registry = build_registry()
    warn_broken_plugins(registry)
    env = Environment.guess()
    if name is not None:
        _describe_step(name, registry, env)
        return
    table = Table()
    for column in ("step", "stage", "applies to", "package"):
        table.add_column(column, no_wrap=True)
    table.add_column("available here")
    table.add_column("summary")
    for step_name, info in sorted(registry.optimizers.items()):
        reason = info.cls.unavailable_reason(env)
        kinds = "any" if len(info.cls.applies_to) > 1 else next(iter(info.cls.applies_to)).value
        available = "[green]yes[/green]" if reason is None else f"[yellow]no[/yellow] ({escape(reason)})"
        table.add_row(
            step_name, info.cls.stage.value, kinds, escape(info.package), available, escape(info.cls.summary)
        )
    wide_console().print(table)
    for problem in registry.problems():
        err.print(f"[red]{escape(problem)}[/red]")


def _describe_step(name: str, registry: Any, env: Any) -> None:
    import difflib

    from dgrun.schema import describe_params

    info = registry.get(name)
    if info is None:
        clash = registry.clash_message(name)
        close = difflib.get_close_matches(name, list(registry.optimizers), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `dgrun steps` lists them"
        fail(EXIT_BAD_INPUT, f"error: {clash or f'no step {name!r} is installed{hint}'}")
    cls = info.cls
    out.print(f"[bold]{escape(name)}[/bold] — {escape(cls.summary or '')}")
    out.print(f"  package: {escape(info.package)} · stage: {cls.stage.value}")
    kinds = ", ".join(sorted(k.value for k in cls.applies_to))
    out.print(f"  applies to: {kinds} pipelines")
    rules = {"tags": cls.tags, "conflicts": cls.conflicts, "after": cls.after, "before": cls.before}
    for label, names in rules.items():
        if names:
            out.print(f"  {label}: {escape(', '.join(sorted(names)))}")
    requirements = [*cls.requires_packages, *(f"device {d}" for d in sorted(cls.requires_devices))]
    if requirements:
        out.print(f"  requires: {escape(', '.join(requirements))}")
    reason = cls.unavailable_reason(env)
    out.print(f"  available here: {'yes' if reason is None else escape('no (' + reason + ')')}")
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc:
        out.print(f"\n{escape(doc)}\n")
    for title, rows in describe_params(name, registry):
        if not rows:
            out.print("  parameters: none")
            continue
        table = Table(title=title, title_justify="left")
        for column in ("parameter", "type", "default", "range", "description"):
            table.add_column(column)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        wide_console().print(table)


@app.command()
def plugins() -> None:
    """Installed plugin packages, their versions and the steps each provides; exit 1 if one is broken or two
    provide the same step."""
    from dgrun.plugins import build_registry

    registry = build_registry()
    table = Table()
    for column in ("plugin", "distribution", "version", "steps", "status"):
        table.add_column(column)
    for plugin in registry.plugins:
        clashing = {
            step
            for step, providers in registry.clashes.items()
            if any((p.plugin, p.distribution) == (plugin.name, plugin.distribution) for p in providers)
        }
        if plugin.error is not None:
            status = f"[red]{escape(plugin.error)}[/red]"
        elif clashing:
            status = f"[red]clash: {escape(', '.join(sorted(set(clashing))))}[/red]"
        else:
            status = "[green]ok[/green]"
        if plugin.warnings:
            status += "".join(f"\n[yellow]{escape(w)}[/yellow]" for w in plugin.warnings)
        table.add_row(plugin.name, plugin.distribution, plugin.version, ", ".join(plugin.optimizers), status)
    wide_console().print(table)
    if registry.filter_note:
        out.print(escape(registry.filter_note))
    problems = registry.problems()
    for problem in problems:
        err.print(f"[red]{escape(problem)}[/red]")
    if problems:
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the recipe format with every installed step's parameters (for editors)."""
    from dgrun.plugins import build_registry
    from dgrun.schema import recipe_schema

    sys.stdout.write(json.dumps(recipe_schema(build_registry()), indent=2) + "\n")
