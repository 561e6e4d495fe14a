"""Steps on a pipeline: loading it as the plan says, applying each step, recovering a failing first call,
and reading what each step measurably did.

The runner keeps the order and the record; here is what happens to one step, and the checks that need
the loaded pipeline (its kind and class for a hub id, the `__call__` arguments `generate.extra` names).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from dgrun.callargs import extra_problems, runtime_call_parameters
from dgrun.errors import Problem, RecipeError, RunError, format_location
from dgrun.loading import LoadedRecipe
from dgrun.models import kind_from_components
from dgrun.optimizer import ApplyContext, Stage, StepEffect, StepResult
from dgrun.planner import Plan, PlannedStep, kind_problems, pipeline_problems
from dgrun.plugins import Registry


def export_process_environment(steps: list[Any], registry: Registry) -> dict[str, str | None]:
    """Set the variables process-stage steps need before torch touches the GPU (CUDA's allocator reads its
    config once); returns the previous values, to put back."""
    previous: dict[str, str | None] = {}
    for spec in steps:
        info = registry.get(spec.name)
        if info is None or info.cls.stage is not Stage.PROCESS:
            continue
        try:
            params = info.cls.Params.model_validate(spec.params)
        except Exception:
            continue  # the planner reports it
        for key, value in info.cls.process_environment(params).items():
            previous.setdefault(key, os.environ.get(key))
            os.environ[key] = value
    return previous


def load_planned(
    loaded: LoadedRecipe, plan: Plan, registry: Registry, ctx: ApplyContext, dtype: Any, trust: bool
) -> Any:
    """Load the model (a plugin's, else diffusers'), with load-stage steps' arguments, then check what only
    the loaded pipeline tells: its kind and class (hub ids), and the `generate.extra` keys it takes."""
    from dgrun.models.hub import load_diffusers_pipeline

    model = loaded.recipe.model
    extra: dict[str, Any] = {}
    for step in plan.ordered():
        if step.stage is Stage.LOAD and step.runnable:
            step.optimizer = step.info.cls(step.params)
            extra.update(step.optimizer.load_kwargs(ctx))
    places_itself = any(s.runnable and s.info.cls.places_modules for s in plan.steps)
    device = "cpu" if places_itself else ctx.env.device
    pipe = registry.load_pipeline(model, device, dtype)
    if pipe is None:
        pipe = load_diffusers_pipeline(model, device, dtype, trust, extra, loaded.path.parent)
    with contextlib.suppress(Exception):
        pipe.set_progress_bar_config(disable=True)
    problems = []
    kind = kind_from_components(getattr(pipe, "components", {}))
    if kind is not None and plan.model_kind is None:
        plan.model_kind = ctx.model_kind = kind
        label = f"{model.id} ({type(pipe).__name__})"
        problems.extend(kind_problems(plan.steps, kind, label, loaded.source))
    if plan.pipeline_class is None:
        problems.extend(pipeline_problems(plan.steps, type(pipe).__name__, loaded.source))
    accepted = runtime_call_parameters(pipe)
    for key, message in extra_problems(loaded.recipe.generate.extra, accepted, type(pipe).__name__).items():
        path = ("generate", "extra", key)
        problems.append(Problem(loaded.source.locate(path, key=True), format_location(path), message))
    if problems:
        raise RecipeError(problems)
    return pipe


def apply_step(step: PlannedStep, pipe: Any, ctx: ApplyContext) -> None:
    """Apply one step and record what became of it; RunError when it fails and may not be skipped."""
    if not step.runnable:
        step.status, step.detail = "skipped", step.reason
        return
    started = time.perf_counter()
    try:
        if step.optimizer is None:
            step.optimizer = step.info.cls(step.params)
        outcome = step.optimizer.apply(pipe, ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        step.seconds = round(time.perf_counter() - started, 4)
        if step.on_unavailable != "skip":
            step.status, step.detail = "failed", f"failed to apply: {reason}"
            raise RunError(f"step {step.name!r} ({step.info.package}) failed to apply: {reason}") from exc
        step.status, step.detail = "skipped", f"failed to apply: {reason}"
        return
    if isinstance(outcome, StepResult):
        step.status, step.detail = outcome.status, outcome.detail
    else:
        step.status, step.detail = "applied", outcome
    step.seconds = round(time.perf_counter() - started, 4)


def recover_steps(plan: Plan, pipe: Any, error: BaseException) -> list[str]:
    """After a failing first call, ask the applied steps (last first) to undo what failed; their messages.

    A step that says `on_unavailable: fail` may not fall back: RunError.
    """
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return []
    messages = []
    for step in reversed(plan.ordered()):
        if step.optimizer is None or step.status not in ("applied", "fell back"):
            continue
        message = step.optimizer.recover(pipe, error)
        if message is None:
            continue
        if step.explicit_fail:
            raise RunError(f"step {step.name!r}: {message} (the step says on_unavailable: fail)") from error
        step.status, step.detail = "fell back", message
        messages.append(f"{step.name}: {message}")
    return messages


def collect_effects(plan: Plan, pipe: Any) -> list[str]:
    """Each applied step's effect into the plan (`no effect` where its counters show none); the warnings."""
    warnings = []
    for step in plan.ordered():
        if step.optimizer is None or step.status not in ("applied", "fell back"):
            continue
        try:
            effect = step.optimizer.effect(pipe)
        except Exception as exc:  # a counter must never fail a finished run
            effect = StepEffect({}, f"could not be measured ({type(exc).__name__}: {exc})")
        step.effect = effect
        if effect is None:
            continue
        if effect.no_effect and step.status == "applied":
            step.status = "no effect"
            step.detail = f"{step.detail}; {effect.no_effect}" if step.detail else effect.no_effect
        if effect.warning:
            prefix = "" if effect.warning.startswith(step.name) else f"{step.name}: "
            warnings.append(prefix + effect.warning)
    return warnings
