"""Resolve recipe steps to optimizers and check every rule before a model is loaded.

Errors (unknown steps, bad params, conflicts, order, wrong model kind) are bad input: all of them are
raised together, each at the later of the two steps involved. A step that cannot run *here* (missing
package, no GPU) is not an error: it gets a reason, and `on_unavailable` decides whether it is skipped or
fails the run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dgrun.errors import Problem, RecipeError, format_location, validation_message
from dgrun.loading import LoadedRecipe
from dgrun.models import static_model_info
from dgrun.optimizer import STAGE_ORDER, Environment, ModelKind, Optimizer, Stage, StepParams, matches
from dgrun.plugins import OptimizerInfo, Registry
from dgrun.recipe import StepSpec
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

    def record(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "params": self.params.model_dump(mode="json"),
            "stage": self.stage.value,
            "plugin": self.info.package,
            "on_unavailable": self.on_unavailable,
            "status": self.status,
            "detail": self.detail,
            "seconds": self.seconds,
        }


@dataclass
class Plan:
    """The checked steps in recipe order; `ordered()` gives execution order (stage, then recipe order)."""

    steps: list[PlannedStep]
    env: Environment
    model_kind: ModelKind | None = None
    model_label: str = ""

    def ordered(self) -> list[PlannedStep]:
        return sorted(self.steps, key=lambda s: (STAGE_ORDER[s.stage], s.index))

    def blocking(self) -> list[PlannedStep]:
        """Steps that cannot run here and are not allowed to be skipped."""
        return [s for s in self.steps if s.reason is not None and s.on_unavailable == "fail"]


def make_plan(
    steps: list[StepSpec],
    registry: Registry,
    env: Environment,
    source: SourceMap,
    default_on_unavailable: str = "fail",
    prefix: DataPath = ("optimize",),
    model_kind: ModelKind | None = None,
    model_label: str = "",
) -> Plan:
    """Resolve and check `steps`; raise RecipeError with every problem found."""
    problems: list[Problem] = []
    planned: list[PlannedStep] = []
    first_use: dict[str, int] = {}

    def problem(path: DataPath, message: str, key: bool = False) -> None:
        problems.append(Problem(source.locate(path, key=key), format_location(path), message))

    for index, spec in enumerate(steps):
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
    if problems:
        raise RecipeError(problems)
    return Plan(planned, env, model_kind)


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
            if any(matches(rule, b) for rule in a.conflicts) or any(matches(rule, a) for rule in b.conflicts):
                message = (
                    f"step {b.name!r} conflicts with {a.name!r} ({_where(prefix, earlier.index)}); "
                    f"keep only one of them"
                )
                problems.append(Problem(source.locate(path), format_location(path), message))
                continue
            if any(matches(rule, b) for rule in a.after):
                order = _valid_order(planned)
                message = (
                    f"step {b.name!r} must come before {a.name!r} ({_where(prefix, earlier.index)}), "
                    f"not after it; a valid order: {order}"
                )
                problems.append(Problem(source.locate(path), format_location(path), message))
    return problems


def _where(prefix: DataPath, index: int) -> str:
    return format_location((*prefix, index))


def _valid_order(planned: list[PlannedStep]) -> str:
    """An order that satisfies every `after` rule, as close to the recipe's order as possible."""
    remaining = list(planned)
    order: list[str] = []
    while remaining:
        for candidate in remaining:
            blockers = [
                other
                for other in remaining
                if other is not candidate
                and any(matches(rule, other.info.cls) for rule in candidate.info.cls.after)
            ]
            if not blockers:
                break
        else:  # the rules contradict each other; fall back to the recipe's order
            candidate = remaining[0]
        order.append(candidate.name)
        remaining.remove(candidate)
    return ", ".join(order)


def _unknown_step_message(name: str, registry: Registry) -> str:
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
    return message


def _param_problem(
    item: dict[str, Any], source: SourceMap, step_path: DataPath, cls: type[Optimizer]
) -> Problem:
    loc = tuple(item["loc"])
    path = (*step_path, *loc)
    if item["type"] == "extra_forbidden":
        fields = list(cls.Params.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else (f"; allowed: {', '.join(fields)}" if fields else "; it takes no parameters")
        )
        return Problem(
            source.locate(path, key=True), format_location(step_path), f"unknown parameter {loc[-1]!r}{hint}"
        )
    if item["type"] == "missing":
        return Problem(source.locate(step_path), format_location(step_path), f"missing parameter {loc[-1]!r}")
    return Problem(source.locate(path), format_location(path), validation_message(item))


def plan_recipe(loaded: LoadedRecipe, registry: Registry, env: Environment) -> Plan:
    """Plan a recipe's steps, and check every variant's: a bad variant is bad input for any command."""
    recipe = loaded.recipe
    base_dir = loaded.path.parent
    kind, label = static_model_info(recipe.model.id, base_dir)
    problems: list[Problem] = []
    plan: Plan | None = None
    try:
        plan = make_plan(
            recipe.optimize,
            registry,
            env,
            loaded.source,
            recipe.on_unavailable,
            model_kind=kind,
            model_label=label,
        )
    except RecipeError as error:
        problems.extend(error.problems)
    for index, variant in enumerate(recipe.variants):
        if variant.optimize is None and variant.model is None:
            continue
        model_id = (variant.model or {}).get("id", recipe.model.id)
        variant_kind, variant_label = static_model_info(str(model_id), base_dir)
        try:
            make_plan(
                variant.optimize if variant.optimize is not None else recipe.optimize,
                registry,
                env,
                loaded.source,
                variant.on_unavailable or recipe.on_unavailable,
                prefix=("variants", index, "optimize") if variant.optimize is not None else ("optimize",),
                model_kind=variant_kind,
                model_label=variant_label,
            )
        except RecipeError as error:
            problems.extend(p for p in error.problems if p not in problems)
    if problems:
        raise RecipeError(problems)
    assert plan is not None
    plan.model_label = label
    return plan
