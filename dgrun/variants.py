"""Variants: named overrides of a recipe that `dgrun bench` compares (and `dgrun tune` proposes).

One home for everything about them: sweeps unrolled into members, a member merged onto the recipe, the
source positions of the merged recipe (so a bad swept value is reported where it was written), and the
validated recipe a member produces, which `dgrun check` plans exactly as `bench` will run it.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgrun.errors import Problem, format_location
from dgrun.recipe import VARIANT_KEYS, Recipe
from dgrun.yamlio import DataPath, SourceMap

if TYPE_CHECKING:
    from dgrun.loading import LoadedRecipe


@dataclass(frozen=True)
class ExpandedVariant:
    """One variant as `dgrun bench` runs it: a sweep is already unrolled into its members."""

    name: str
    index: int  # position in `variants:`, for error messages
    description: str | None
    overrides: dict[str, Any]
    sweep: dict[str, Any]  # this member's swept values; empty for a variant without a sweep


def _value_slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-") or "none"


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = target.get(part)
        target[part] = child = dict(child) if isinstance(child, dict) else {}
        target = child
    target[path[-1]] = value


def _with_value(overrides: dict[str, Any], recipe: Recipe, key: str, value: Any) -> None:
    """Set one swept value in a variant's overrides (starting from the recipe's steps or nested mapping
    when the variant has none, since a variant's lists and nested mappings replace the recipe's)."""
    head, *rest = key.split(".")
    if head in ("generate", "model"):
        section = overrides.setdefault(head, {})
        if len(rest) > 1 and rest[0] not in section:
            section[rest[0]] = copy.deepcopy(getattr(getattr(recipe, head), rest[0]))
        _set_path(section, rest, value)
        return
    steps = overrides.setdefault("optimize", [s.as_item() for s in recipe.optimize])
    for position, item in enumerate(steps):
        name = item if isinstance(item, str) else next(iter(item))
        if name == head:
            params = {} if isinstance(item, str) else dict(item[name] or {})
            _set_path(params, rest, value)
            steps[position] = {name: params}
            return
    raise ValueError(f"sweep {key!r}: no step {head!r} to set")  # the validator has ruled this out


def expand_variants(recipe: Recipe) -> list[ExpandedVariant]:
    """The recipe's variants with each sweep unrolled, in order; members are named NAME-PARAM-VALUE."""
    expanded = []
    for index, variant in enumerate(recipe.variants):
        if not variant.sweep:
            expanded.append(
                ExpandedVariant(variant.name, index, variant.description, variant.overrides(), {})
            )
            continue
        keys = list(variant.sweep)
        for combination in itertools.product(*(variant.sweep[k] for k in keys)):
            overrides = copy.deepcopy(variant.overrides())
            parts = [variant.name]
            for key, value in zip(keys, combination, strict=True):
                _with_value(overrides, recipe, key, value)
                parts.append(f"{key.rsplit('.', 1)[-1]}-{_value_slug(value)}")
            sweep = dict(zip(keys, combination, strict=True))
            expanded.append(ExpandedVariant("-".join(parts), index, variant.description, overrides, sweep))
    return expanded


def apply_variant(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recipe data with a variant's overrides merged in (mappings merge, lists replace), no variants."""
    merged = {k: v for k, v in data.items() if k != "variants"}
    for key in VARIANT_KEYS:
        if key not in overrides:
            continue
        value = overrides[key]
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def variant_source(
    source: SourceMap, own: dict[str, Any], index: int, sweep: dict[str, Any], overrides: dict[str, Any]
) -> SourceMap:
    """Positions for a variant's merged recipe: what the variant overrides points into `variants[i]`.

    A swept value points at its `sweep:` key, so a bad value is reported where it was written.
    """
    mapped = SourceMap(dict(source.values), dict(source.keys), source.default)
    prefix: DataPath = ("variants", index)
    for key, value in own.items():
        merged_by_key = isinstance(value, dict) and key in ("model", "generate")
        for path in [(key, k) for k in value] if merged_by_key else [(key,)]:
            origin = (*prefix, *path)
            n = len(origin)
            mapped.replace_subtree(
                path,
                SourceMap(
                    values={(*path, *p[n:]): v for p, v in source.values.items() if p[:n] == origin},
                    keys={(*path, *p[n:]): v for p, v in source.keys.items() if p[:n] == origin},
                ),
            )
    steps = [s if isinstance(s, str) else next(iter(s)) for s in overrides.get("optimize") or []]
    for key in sweep:
        position = source.locate((*prefix, "sweep", key), key=True)
        head, *rest = key.split(".")
        path: DataPath = (
            (head, *rest)
            if head in ("generate", "model")
            else ("optimize", steps.index(head), *key.split("."))
        )
        mapped.values[path] = mapped.keys[path] = position
    return mapped


BASELINE = "baseline"


def member_name_problems(loaded: LoadedRecipe, members: list[ExpandedVariant]) -> list[Problem]:
    """Bench names its columns baseline, the recipe (when it has steps) and each member: all distinct."""
    seen = {BASELINE: "the baseline"}
    if loaded.recipe.optimize:
        seen[loaded.recipe.name] = "the recipe"
    problems = []
    for member in members:
        if member.name in seen:
            path = ("variants", member.index, "name")
            message = f"variant {member.name!r} has the same name as {seen[member.name]}; rename one"
            problems.append(Problem(loaded.source.locate(path), format_location(path), message))
            continue
        seen[member.name] = f"variants[{member.index}]"
    return problems


def variant_recipe(
    loaded: LoadedRecipe,
    overrides: dict[str, Any],
    index: int | None = None,
    sweep: dict[str, Any] | None = None,
) -> LoadedRecipe:
    """The validated recipe that `overrides` make of `loaded` (variant `index`'s member, when given).

    Raises RecipeError located in the recipe file, as `dgrun check` reports it.
    """
    from dgrun.loading import LoadedRecipe, validate

    source = loaded.source
    if index is not None:
        own = loaded.recipe.variants[index].overrides()
        source = variant_source(source, own, index, sweep or {}, overrides)
    data = apply_variant(loaded.recipe.resolved(), overrides)
    return LoadedRecipe(validate(data, source), source, loaded.path)


def member_recipe(loaded: LoadedRecipe, member: ExpandedVariant) -> LoadedRecipe:
    """The validated recipe of one expanded variant member."""
    return variant_recipe(loaded, member.overrides, member.index, member.sweep)
