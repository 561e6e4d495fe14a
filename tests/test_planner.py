"""The planner with the real step registry on a CPU: unknown steps and params, conflicts, order, model kind,
duplicates, and what `on_unavailable` makes of a step that cannot run here. No model is loaded."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from recipe_text import only

from dgrun.errors import Problem, RecipeError
from dgrun.loading import load_recipe
from dgrun.models import static_model_info
from dgrun.optimizer import ApplyContext, Environment, ModelKind, Optimizer
from dgrun.planner import Plan, make_plan
from dgrun.plugins import OptimizerInfo, Registry

CPU = Environment(device="cpu", device_kind="cpu")
FLUX = "dgrun:tiny-flux"  # a transformer pipeline
SD = "dgrun:tiny-sd"  # a UNet pipeline


class OtherCache(Optimizer):
    """A cache from a third-party plugin: tagged `cache`, and declaring no conflicts of its own."""

    name = "other_cache"
    summary = "a test cache"
    tags = frozenset({"cache"})
    applies_to = frozenset({ModelKind.TRANSFORMER})

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        return None


@pytest.fixture(scope="module")
def with_other_cache(registry: Registry) -> Registry:
    """The real registry plus a plugin-provided cache, assembled by hand."""
    info = OptimizerInfo(OtherCache, "other", "dgrun-other-cache", "1.0")
    return Registry(registry.manager, optimizers={**registry.optimizers, "other_cache": info})


def recipe_text(optimize: str, model: str = FLUX, extra: str = "") -> str:
    steps = textwrap.indent(textwrap.dedent(optimize), "  ")
    return f"dgrun: 1\nname: plan\nmodel:\n  id: {model}\n{extra}prompts: [a cat]\noptimize:\n{steps}"


def plan(
    registry: Registry,
    tmp_path: Path,
    steps: str,
    model: str = FLUX,
    extra: str = "",
    **load_kwargs: Any,
) -> Plan:
    """Load a recipe with these steps and plan it the way `dgrun check` does (model kind known)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(steps, model, extra))
    loaded = load_recipe(path, **load_kwargs)
    kind, label = static_model_info(loaded.recipe.model.id)
    return make_plan(
        loaded.recipe.optimize,
        registry,
        CPU,
        loaded.source,
        loaded.recipe.on_unavailable,
        model_kind=kind,
        model_label=label,
    )


def problems(registry: Registry, tmp_path: Path, steps: str, **kwargs: Any) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        plan(registry, tmp_path, steps, **kwargs)
    assert info.value.problems
    return info.value.problems


def line_of(optimize: str, needle: str, model: str = FLUX, extra: str = "") -> int:
    text = recipe_text(optimize, model, extra)
    return text.count("\n", 0, text.index(needle)) + 1


# ----------------------------------------------------------------------------------------------- valid


def test_valid_plan_resolves_every_step(registry: Registry, tmp_path: Path) -> None:
    result = plan(registry, tmp_path, "- fuse_qkv\n- first_block_cache\n- tf32\n- compile\n")
    assert [s.name for s in result.steps] == ["fuse_qkv", "first_block_cache", "tf32", "compile"]
    assert result.steps[1].params.threshold == 0.2
    assert all(s.outlook() == "will apply" for s in result.steps)
    assert result.blocking() == []
    # process-wide settings run before the pipeline steps; the rest keeps recipe order
    assert [s.name for s in result.ordered()] == ["tf32", "fuse_qkv", "first_block_cache", "compile"]


def test_step_params_are_validated_into_the_step_model(registry: Registry, tmp_path: Path) -> None:
    result = plan(
        registry, tmp_path, "- first_block_cache: {threshold: 0.05}\n- compile: {mode: max-autotune}\n"
    )
    assert result.steps[0].params.threshold == 0.05
    assert result.steps[1].params.mode == "max-autotune"


# -------------------------------------------------------------------------------------- unknown names


def test_unknown_step_suggests_the_close_one(registry: Registry, tmp_path: Path) -> None:
    optimize = "- tf32\n- compil\n"
    problem = only(problems(registry, tmp_path, optimize))
    assert problem.position.file.endswith("recipe.yaml")
    assert problem.position.line == line_of(optimize, "compil")
    assert problem.location == "optimize[1]"
    assert "unknown step 'compil'" in problem.message
    assert "did you mean 'compile'" in problem.message


def test_unknown_step_without_a_close_one_points_to_dgrun_steps(registry: Registry, tmp_path: Path) -> None:
    problem = only(problems(registry, tmp_path, "- zzzzzz\n"))
    assert "unknown step 'zzzzzz'" in problem.message
    assert "dgrun steps" in problem.message


def test_unknown_step_from_the_optimize_flag_is_reported_at_the_flag(
    registry: Registry, tmp_path: Path
) -> None:
    problem = only(problems(registry, tmp_path, "- tf32\n", optimize="tf32,compil:mode=default"))
    assert problem.position.file == "<--optimize tf32,compil:mode=default>"
    assert "did you mean 'compile'" in problem.message


def test_unknown_param_suggests_the_close_one(registry: Registry, tmp_path: Path) -> None:
    optimize = "- first_block_cache: {treshold: 0.1}\n"
    problem = only(problems(registry, tmp_path, optimize))
    text = recipe_text(optimize)
    assert problem.position.line == line_of(optimize, "treshold")
    assert problem.position.column == text.index("treshold") - text.rfind("\n", 0, text.index("treshold"))
    assert problem.location == "optimize[0].first_block_cache"
    assert "unknown parameter 'treshold'" in problem.message
    assert "did you mean 'threshold'" in problem.message


def test_unknown_param_of_a_step_without_params(registry: Registry, tmp_path: Path) -> None:
    problem = only(problems(registry, tmp_path, "- vae_slicing: {tiles: 2}\n"))
    assert "unknown parameter 'tiles'" in problem.message
    assert "no parameters" in problem.message


@pytest.mark.parametrize(
    ("step", "param", "value", "word"),
    [
        ("first_block_cache", "threshold", "fast", "number"),
        ("first_block_cache", "threshold", "-1", "greater than 0"),
        ("tf32", "enabled", "'yes'", "boolean"),
        ("compile", "mode", "fastest", "max-autotune"),
        ("attention_backend", "backend", "flashy", "unknown attention backend 'flashy'"),
    ],
)
def test_bad_param_value(
    registry: Registry, tmp_path: Path, step: str, param: str, value: str, word: str
) -> None:
    steps = f"- vae_tiling\n- {step}: {{{param}: {value}}}\n"
    problem = only(problems(registry, tmp_path, steps))
    text = recipe_text(steps)
    offset = text.index(f"{param}: {value}") + len(param) + 2
    assert problem.position.line == text.count("\n", 0, offset) + 1
    assert problem.position.column == offset - text.rfind("\n", 0, offset)
    assert problem.location == f"optimize[1].{step}.{param}"
    assert word in problem.message


def test_missing_required_param(registry: Registry, tmp_path: Path) -> None:
    problem = only(problems(registry, tmp_path, "- tf32\n- attention_backend\n"))
    assert problem.location.startswith("optimize[1]")
    assert "missing parameter 'backend'" in problem.message


# ------------------------------------------------------------------------------------ conflicts, order


@pytest.mark.parametrize(
    "first, second", [("first_block_cache", "other_cache"), ("other_cache", "first_block_cache")]
)
def test_two_caches_conflict(with_other_cache: Registry, tmp_path: Path, first: str, second: str) -> None:
    optimize = f"- {first}\n- tf32\n- {second}\n"
    problem = only(problems(with_other_cache, tmp_path, optimize))
    # positioned at the later of the two steps, naming both
    assert problem.position.line == line_of(optimize, f"- {second}")
    assert problem.location == "optimize[2]"
    assert f"'{second}'" in problem.message and f"'{first}'" in problem.message
    assert "conflicts" in problem.message
    assert "optimize[0]" in problem.message


def test_one_cache_alone_is_fine(with_other_cache: Registry, tmp_path: Path) -> None:
    assert [s.name for s in plan(with_other_cache, tmp_path, "- other_cache\n").steps] == ["other_cache"]


def test_cache_before_fuse_qkv_is_an_order_error(registry: Registry, tmp_path: Path) -> None:
    optimize = "- first_block_cache\n- tf32\n- fuse_qkv\n"
    problem = only(problems(registry, tmp_path, optimize))
    assert problem.position.line == line_of(optimize, "fuse_qkv")  # the later step
    assert problem.location == "optimize[2]"
    assert "'fuse_qkv'" in problem.message and "'first_block_cache'" in problem.message
    assert "must come before" in problem.message
    order = suggested_order(problem)
    assert order.index("fuse_qkv") < order.index("first_block_cache")


def test_compile_before_a_module_rewriting_step_is_an_order_error(registry: Registry, tmp_path: Path) -> None:
    optimize = "- compile\n- fuse_qkv\n"
    problem = only(problems(registry, tmp_path, optimize))
    assert problem.position.line == line_of(optimize, "fuse_qkv")
    assert "'compile'" in problem.message and "'fuse_qkv'" in problem.message
    assert suggested_order(problem) == ["fuse_qkv", "compile"]


def suggested_order(problem: Problem) -> list[str]:
    match = re.search(r"a valid order: ([a-z0-9_, ]+)", problem.message)
    assert match, problem.message
    return [name.strip() for name in match.group(1).split(",")]


def test_the_suggested_order_is_valid_for_two_steps(registry: Registry, tmp_path: Path) -> None:
    problem = only(problems(registry, tmp_path, "- first_block_cache\n- fuse_qkv\n"))
    fixed = "".join(f"- {name}\n" for name in suggested_order(problem))
    assert plan(registry, tmp_path, fixed).steps


def test_every_suggested_order_is_valid(registry: Registry, tmp_path: Path) -> None:
    found = problems(registry, tmp_path, "- compile\n- fuse_qkv\n- first_block_cache\n")
    assert found
    for problem in found:
        fixed = "".join(f"- {name}\n" for name in suggested_order(problem))
        plan(registry, tmp_path, fixed)  # raises RecipeError if the suggestion is not valid


def test_model_kind_rule_names_the_model_class(registry: Registry, tmp_path: Path) -> None:
    optimize = "- tf32\n- first_block_cache\n"
    problem = only(problems(registry, tmp_path, optimize, model=SD))
    assert problem.position.line == line_of(optimize, "first_block_cache", model=SD)
    assert problem.location == "optimize[1]"
    assert "'first_block_cache'" in problem.message
    assert "StableDiffusionPipeline" in problem.message
    assert "UNet" in problem.message and "transformer" in problem.message


def test_model_kind_is_not_checked_when_unknown(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text("- first_block_cache\n", model="some-org/some-model"))
    loaded = load_recipe(path)
    result = make_plan(loaded.recipe.optimize, registry, CPU, loaded.source, model_kind=None)
    assert [s.name for s in result.steps] == ["first_block_cache"]


def test_a_step_twice_points_at_the_second(registry: Registry, tmp_path: Path) -> None:
    optimize = "- tf32\n- vae_tiling\n- tf32: {enabled: false}\n"
    problem = only(problems(registry, tmp_path, optimize))
    assert problem.position.line == line_of(optimize, "tf32: {")
    assert problem.location == "optimize[2]"
    assert "twice" in problem.message
    assert "optimize[0]" in problem.message


def test_all_planner_problems_are_reported_at_once(registry: Registry, tmp_path: Path) -> None:
    optimize = "- compil\n- first_block_cache: {treshold: 0.1}\n- tf32\n- tf32\n- compile\n- fuse_qkv\n"
    found = problems(registry, tmp_path, optimize, model=SD)
    assert {p.location.split(".")[0] for p in found} >= {
        "optimize[0]",
        "optimize[1]",
        "optimize[3]",
        "optimize[5]",
    }


# -------------------------------------------------------------------------------------- on_unavailable


@pytest.mark.parametrize(
    ("step", "recipe_default", "expected"),
    [
        ("- attention_backend: {backend: flash}\n", "", "fail"),
        ("- attention_backend: {backend: flash}\n", "on_unavailable: skip\n", "skip"),
        ("- attention_backend: {backend: flash, on_unavailable: skip}\n", "", "skip"),
        ("- attention_backend: {backend: flash, on_unavailable: skip}\n", "on_unavailable: fail\n", "skip"),
        ("- attention_backend: {backend: flash, on_unavailable: fail}\n", "on_unavailable: skip\n", "fail"),
    ],
)
def test_on_unavailable_resolution(
    registry: Registry, tmp_path: Path, step: str, recipe_default: str, expected: str
) -> None:
    result = plan(registry, tmp_path, "- tf32\n" + step, extra=recipe_default)
    tf32, attention = result.steps
    assert tf32.outlook() == "will apply"
    assert attention.on_unavailable == expected
    assert not attention.runnable
    assert "flash_attn" in attention.reason or "CUDA" in attention.reason
    outlook = attention.outlook()
    if expected == "skip":
        assert outlook.startswith("will be skipped")
        assert result.blocking() == []
    else:
        assert outlook.startswith("will fail here")
        assert result.blocking() == [attention]
    assert attention.reason in outlook


def test_a_backend_list_falls_back_to_a_usable_one(registry: Registry, tmp_path: Path) -> None:
    result = plan(registry, tmp_path, "- attention_backend: {backend: [flash_3, flash, native]}\n")
    (attention,) = result.steps
    assert attention.runnable
    assert attention.outlook() == "will apply"


def test_an_unavailable_step_is_not_a_recipe_error(registry: Registry, tmp_path: Path) -> None:
    # missing packages or a missing GPU never make planning fail: they only decide the outlook
    result = plan(registry, tmp_path, "- attention_backend: {backend: sage}\n- compile\n")
    assert [s.name for s in result.steps] == ["attention_backend", "compile"]
    assert result.steps[0].outlook().startswith("will fail here")
