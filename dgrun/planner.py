"""Resolve recipe steps to optimizers and check every rule before a model is loaded.

Errors (unknown steps, bad params, conflicts, order, wrong model kind) are bad input: all of them are
raised together, each at the later of the two steps involved. A step that cannot run *here* (missing
package, no GPU) is not an error: it gets a reason, and `on_unavailable` decides whether it is skipped or
fails the run.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dgrun.callargs import extra_problems, static_call_parameters
from dgrun.errors import Problem, RecipeError, format_location, validation_message
from dgrun.loading import LoadedRecipe
from dgrun.models import local_model_problem, static_model_info, static_modules, static_pipeline_class
from dgrun.optimizer import (
    STAGE_ORDER,
    Environment,
    ModelKind,
    Optimizer,
    PlanView,
    Stage,
    StepEffect,
    StepParams,
    matches,
)
from dgrun.plugins import OptimizerInfo, Registry
from dgrun.recipe import StepSpec
from dgrun.runrecord import StepRecord
from dgrun.variants import ExpandedVariant, expand_variants, member_name_problems, member_recipe
from dgrun.yamlio import DataPath, SourceMap

KIND_LABELS = {ModelKind.UNET: "UNet", ModelKind.TRANSFORMER: "transformer"}


@dataclass
class PlannedStep:
    """One step of the plan, and (after the run) what became of it."""

    index: int
    info: OptimizerInfo
    params: StepParams
    on_unavailable: str
    explicit_fail: bool = False
    reason: str | None = None
    status: str = "planned"
    detail: str | None = None
    seconds: float | None = None
    optimizer: Optimizer | None = None
    effect: StepEffect | None = None

    @property
    def name(self) -> str:
        return self.info.cls.name

    @property
    def stage(self) -> Stage:
        return self.info.cls.stage

    @property
    def runnable(self) -> bool:
        return self.reason is None

    def outlook(self) -> str:
        """What the runner will do with this step here, in words (for `check` and `--dry-run`)."""
        if self.reason is None:
            return "will apply"
        if self.on_unavailable == "skip":
            return f"will be skipped: {self.reason}"
        return f"will fail here: {self.reason}"

    def record(self) -> StepRecord:
        """This step's entry in run.json."""
        return StepRecord(
            step=self.name,
            params=self.params.model_dump(mode="json"),
            stage=self.stage.value,
            plugin=self.info.package,
            on_unavailable=self.on_unavailable,
            status=self.status,
            detail=self.detail,
            seconds=self.seconds,
            effect=self.effect.record() if self.effect is not None else None,
        )


@dataclass
class Plan:
    """The checked steps in recipe order; `ordered()` gives execution order (stage, then recipe order)."""

    steps: list[PlannedStep]
    env: Environment
    model_kind: ModelKind | None = None
    model_label: str = ""
    pipeline_class: str | None = None

    def ordered(self) -> list[PlannedStep]:
        return sorted(self.steps, key=lambda s: (STAGE_ORDER[s.stage], s.index))

    def blocking(self) -> list[PlannedStep]:
        """Steps that cannot run here and are not allowed to be skipped."""
        return [s for s in self.steps if s.reason is not None and s.on_unavailable == "fail"]


def make_plan(
    steps: Sequence[StepSpec | None],
    registry: Registry,
    env: Environment,
    source: SourceMap,
    default_on_unavailable: str = "fail",
    prefix: DataPath = ("optimize",),
    model_kind: ModelKind | None = None,
    model_label: str = "",
    pipeline_class: str | None = None,
) -> Plan:
    """Resolve and check `steps` (None: an item already reported as malformed); raise RecipeError with every
    problem found."""
    problems: list[Problem] = []
    planned: list[PlannedStep] = []
    first_use: dict[str, int] = {}

    def problem(path: DataPath, message: str, key: bool = False) -> None:
        problems.append(Problem(source.locate(path, key=key), format_location(path), message))

    for index, spec in enumerate(steps):
        if spec is None:
            continue
        item_path = (*prefix, index)
        info = registry.get(spec.name)
        if info is None:
            problem(item_path, _unknown_step_message(spec.name, registry))
            continue
        if spec.name in first_use:
            problem(
                item_path,
                f"step {spec.name!r} appears twice (first at {_where(prefix, first_use[spec.name])})",
            )
            continue
        first_use[spec.name] = index
        try:
            params = info.cls.Params.model_validate(spec.params)
        except ValidationError as error:
            for item in error.errors(include_url=False):
                problems.append(_param_problem(item, source, (*item_path, spec.name), info.cls))
            continue
        on_unavailable = spec.on_unavailable or default_on_unavailable
        step = PlannedStep(index, info, params, on_unavailable, explicit_fail=spec.on_unavailable == "fail")
        step.reason = info.cls.unavailable_reason(env, params)
        planned.append(step)

    problems.extend(_rule_problems(planned, source, prefix))
    if model_kind is not None:
        problems.extend(kind_problems(planned, model_kind, model_label, source, prefix))
    if pipeline_class is not None:
        problems.extend(pipeline_problems(planned, pipeline_class, source, prefix))
    if problems:
        raise RecipeError(problems)
    return Plan(planned, env, model_kind)


def pipeline_problems(
    planned: list[PlannedStep], pipeline_class: str, source: SourceMap, prefix: DataPath = ("optimize",)
) -> list[Problem]:
    """Steps that cannot work on this pipeline class (known before loading for built-in and local models)."""
    problems = []
    for step in planned:
        reason = step.info.cls.pipeline_problem(pipeline_class)
        if reason:
            path = (*prefix, step.index)
            message = f"step {step.name!r} cannot run on {pipeline_class}: {reason}"
            problems.append(Problem(source.locate(path), format_location(path), message))
    return problems


def kind_problems(
    planned: list[PlannedStep],
    kind: ModelKind,
    label: str,
    source: SourceMap,
    prefix: DataPath = ("optimize",),
) -> list[Problem]:
    """Steps that do not apply to this kind of model (instead of diffusers' silent no-ops)."""
    problems = []
    for step in planned:
        if kind not in step.info.cls.applies_to:
            wanted = " or ".join(KIND_LABELS[k] for k in sorted(step.info.cls.applies_to, key=str))
            path = (*prefix, step.index)
            message = (
                f"step {step.name!r} works on {wanted} pipelines only; {label or 'this model'} is a "
                f"{KIND_LABELS[kind]} pipeline; remove the step or change the model"
            )
            problems.append(Problem(source.locate(path), format_location(path), message))
    return problems


def _rule_problems(planned: list[PlannedStep], source: SourceMap, prefix: DataPath) -> list[Problem]:
    problems = []
    for later_pos, later in enumerate(planned):
        for earlier in planned[:later_pos]:
            a, b = earlier.info.cls, later.info.cls
            path = (*prefix, later.index)
            rules = [(r, a) for r in a.conflicts if matches(r, b)] + [
                (r, b) for r in b.conflicts if matches(r, a)
            ]
            if rules:
                reasons = [
                    owner.conflict_reasons[rule] for rule, owner in rules if rule in owner.conflict_reasons
                ]
                message = (
                    f"step {b.name!r} conflicts with {a.name!r} ({_where(prefix, earlier.index)}); "
                    f"keep only one of them" + (f" ({reasons[0]})" if reasons else "")
                )
                problems.append(Problem(source.locate(path), format_location(path), message))
                continue
            # `a` comes first in the recipe: wrong when a must follow b, or b must precede a.
            if _must_precede(b, a):
                order = _valid_order(planned)
                message = (
                    f"step {b.name!r} must come before {a.name!r} ({_where(prefix, earlier.index)}), "
                    f"not after it; a valid order: {order}"
                )
                problems.append(Problem(source.locate(path), format_location(path), message))
    return problems


def _where(prefix: DataPath, index: int) -> str:
    return format_location((*prefix, index))


def _must_precede(first: type[Optimizer], second: type[Optimizer]) -> bool:
    """Whether a rule puts `first` before `second`: second's `after` names first, or first's `before`
    names second."""
    return any(matches(rule, first) for rule in second.after) or any(
        matches(rule, second) for rule in first.before
    )


def _valid_order(planned: list[PlannedStep]) -> str:
    """An order that satisfies every `after` and `before` rule, as close to the recipe's order as possible."""
    remaining = list(planned)
    order: list[str] = []
    while remaining:
        for candidate in remaining:
            blockers = [
                other
                for other in remaining
                if other is not candidate and _must_precede(other.info.cls, candidate.info.cls)
            ]
            if not blockers:
                break
        else:  # the rules contradict each other; fall back to the recipe's order
            candidate = remaining[0]
        order.append(candidate.name)
        remaining.remove(candidate)
    return ", ".join(order)


def _unknown_step_message(name: str, registry: Registry) -> str:
    clash = registry.clash_message(name)
    if clash:
        return clash
    known = sorted(registry.optimizers)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    message = f"unknown step {name!r}"
    if close:
        message += f"; did you mean {close[0]!r}?"
    else:
        message += "; `dgrun steps` lists the steps installed here"
    broken = [p.distribution or p.name for p in registry.failed()]
    if broken:
        message += f" (plugins that failed to load: {', '.join(broken)})"
    if registry.filter_note:
        message += f" ({registry.filter_note})"
    return message


def _param_problem(
    item: dict[str, Any], source: SourceMap, step_path: DataPath, cls: type[Optimizer]
) -> Problem:
    loc = tuple(item["loc"])
    path = (*step_path, *loc)
    if item["type"] == "extra_forbidden":
        model = _nested_model(cls.Params, loc[:-1])
        fields = [field.alias or name for name, field in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = getattr(model, "unknown_key_hint", None)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif not hint:
            hint = f"allowed: {', '.join(fields)}" if fields else "it takes no parameters"
        owner = format_location((*step_path, *loc[:-1]))
        return Problem(source.locate(path, key=True), owner, f"unknown parameter {loc[-1]!r}; {hint}")
    if item["type"] == "missing":
        return Problem(source.locate(step_path), format_location(step_path), f"missing parameter {loc[-1]!r}")
    return Problem(source.locate(path), format_location(path), validation_message(item))


def _nested_model(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The params model that validates the mapping at `loc` inside a step's params (for suggestions)."""
    for part in loc:
        field = model.model_fields.get(str(part)) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return model
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,) if _is_model(a)]
        if not nested:
            return model
        model = nested[0]
    return model


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def plan_recipe(loaded: LoadedRecipe, registry: Registry, env: Environment) -> Plan:
    """Plan a recipe's steps and every variant member's, as `run` and `bench` will: a bad variant (or a
    swept value that makes a bad recipe) is bad input for any command."""
    problems: list[Problem] = []
    plan: Plan | None = None
    try:
        plan = _plan_one(loaded, registry, env)
    except RecipeError as error:
        problems.extend(error.problems)
    try:
        members = expand_variants(loaded.recipe)
        problems.extend(p for p in member_name_problems(loaded, members) if p not in problems)
    except ValueError:  # a sweep path the recipe's validation has already reported
        members = []
    for member in members:
        owns_steps = "optimize" in loaded.recipe.variants[member.index].overrides()
        try:
            _plan_one(member_recipe(loaded, member), registry, env, member if owns_steps else None)
        except RecipeError as error:
            problems.extend(p for p in error.problems if p not in problems)
    if problems:
        raise RecipeError(problems)
    assert plan is not None
    return plan


def _plan_one(
    loaded: LoadedRecipe, registry: Registry, env: Environment, steps_of: ExpandedVariant | None = None
) -> Plan:
    """Plan one recipe (or variant member): steps, model kind and class, and `generate.extra`.

    `steps_of`: the member whose variant wrote its own `optimize`, so problems are named there.
    """
    recipe = loaded.recipe
    base_dir = loaded.path.parent
    kind, label = static_model_info(recipe.model.id, base_dir)
    pipeline_class = static_pipeline_class(recipe.model.id, base_dir)
    prefix: DataPath = ("optimize",)
    source = loaded.source
    if steps_of is not None:
        prefix = ("variants", steps_of.index, "optimize")
        source = _variant_step_source(loaded.source, steps_of)
    problems: list[Problem] = []
    plan: Plan | None = None
    try:
        plan = make_plan(
            recipe.optimize,
            registry,
            env,
            source,
            recipe.on_unavailable,
            prefix=prefix,
            model_kind=kind,
            model_label=label,
            pipeline_class=pipeline_class,
        )
    except RecipeError as error:
        problems.extend(error.problems)
    if plan is not None:
        problems.extend(combination_problems(plan.steps, recipe, pipeline_class, source, prefix))
    problems.extend(extra_problems_at(recipe.generate.extra, pipeline_class, loaded.source))
    if recipe.tune is not None and steps_of is None:
        from dgrun.tune.spec import space_problems

        problems.extend(space_problems(recipe.tune, registry, loaded.source))
    model_problem = local_model_problem(recipe.model.id, base_dir)
    if model_problem:
        problems.append(loaded.problem(("model", "id"), model_problem))
    modules = static_modules(recipe.model.id, base_dir)
    if plan is not None and modules is not None:
        problems.extend(component_problems(plan.steps, modules, label, source, prefix))
    if problems:
        raise RecipeError(problems)
    assert plan is not None
    plan.model_label = label
    plan.pipeline_class = pipeline_class
    return plan


def combination_problems(
    planned: list[PlannedStep], recipe: Any, pipeline_class: str | None, source: SourceMap, prefix: DataPath
) -> list[Problem]:
    """Rules that depend on parameters and on the rest of the recipe (`Optimizer.combination_problem`)."""
    view = PlanView([(s.info.cls, s.params) for s in planned], recipe, pipeline_class)
    problems = []
    for step in planned:
        reason = step.info.cls.combination_problem(step.params, view)
        if reason:
            path = (*prefix, step.index)
            problems.append(
                Problem(source.locate(path), format_location(path), f"step {step.name!r}: {reason}")
            )
    return problems


def component_problems(
    planned: list[PlannedStep], modules: Sequence[str], label: str, source: SourceMap, prefix: DataPath
) -> list[Problem]:
    """`components:` names the model does not have (known before loading: built-in and local models)."""
    problems = []
    for step in planned:
        names = getattr(step.params, "components", None)
        for position, name in enumerate(names or []):
            if name not in modules:
                path = (*prefix, step.index, step.name, "components", position)
                message = f"{label or 'the model'} has no component {name!r}; it has: {', '.join(modules)}"
                problems.append(Problem(source.locate(path), format_location(path), message))
    return problems


def extra_problems_at(extra: Any, pipeline_class: str | None, source: SourceMap) -> list[Problem]:
    """`generate.extra` keys dgrun refuses, or (class known) that the pipeline's `__call__` does not name."""
    if not isinstance(extra, dict) or not extra:
        return []
    accepted = static_call_parameters(pipeline_class) if pipeline_class else None
    problems = []
    for key, message in extra_problems(extra, accepted, pipeline_class or "the pipeline").items():
        path = ("generate", "extra", key)
        problems.append(Problem(source.locate(path, key=True), format_location(path), message))
    return problems


def _variant_step_source(source: SourceMap, member: ExpandedVariant) -> SourceMap:
    """Positions for a member whose variant has its own steps: its problems are named
    `variants[i].optimize[j]`, and a swept parameter points at its `sweep:` key (as `variant_source`
    maps it under `optimize`)."""
    mapped = SourceMap(dict(source.values), dict(source.keys), source.default)
    target: DataPath = ("variants", member.index)
    for table in (mapped.values, mapped.keys):
        for path, position in list(table.items()):
            if path[:1] == ("optimize",):
                table[(*target, *path)] = position
    return mapped
