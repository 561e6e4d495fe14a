"""Checking a recipe file as a whole: every problem in one pass, step parameters included.

`load_recipe` stops at the recipe's own validation; when that fails, the steps are still resolved and their
parameters checked here, so a user fixes a file once instead of seeing step errors only after the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dgrun.errors import Problem, RecipeError
from dgrun.loading import LoadedRecipe, load_recipe
from dgrun.models import static_model_info, static_pipeline_class
from dgrun.optimizer import Environment
from dgrun.planner import extra_problems_at, make_plan
from dgrun.plugins import Registry
from dgrun.recipe import StepSpec
from dgrun.yamlio import SourceMap


def load_checked(path: Any, sets: Sequence[str], optimize: str | None, registry: Registry) -> LoadedRecipe:
    """`load_recipe`, and when the recipe is invalid, its step parameters checked too: every problem of a
    file in one pass, instead of step errors only after the rest is fixed."""
    try:
        return load_recipe(path, list(sets), optimize)
    except RecipeError as error:
        if error.document is None:
            raise
        data, source = error.document
        extra = _step_problems(data, source, registry, Path(path).parent)
        raise RecipeError([*error.problems, *(p for p in extra if p not in error.problems)]) from None


def _step_problems(data: Any, source: SourceMap, registry: Registry, base_dir: Path) -> list[Problem]:
    from pydantic import TypeAdapter

    from dgrun.recipe import StepItem

    items = data.get("optimize") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    adapter = TypeAdapter(StepItem)
    specs: list[StepSpec | None] = []
    for item in items:
        try:
            specs.append(adapter.validate_python(item))
        except ValidationError:
            specs.append(None)  # reported by the recipe's own validation
    default = data.get("on_unavailable") if data.get("on_unavailable") in ("fail", "skip") else "fail"
    model = data.get("model")
    model_id = model.get("id") if isinstance(model, dict) else None
    kind, label, pipeline_class = None, "", None
    if isinstance(model_id, str):
        kind, label = static_model_info(model_id, base_dir)
        pipeline_class = static_pipeline_class(model_id, base_dir)
    try:
        make_plan(
            specs,
            registry,
            Environment.guess(),
            source,
            default,
            model_kind=kind,
            model_label=label,
            pipeline_class=pipeline_class,
        )
    except RecipeError as error:
        problems = error.problems
    else:
        problems = []
    generate = data.get("generate")
    extra = generate.get("extra") if isinstance(generate, dict) else None
    return problems + extra_problems_at(extra, pipeline_class, source)
