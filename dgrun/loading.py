"""From a recipe file (plus `extends` bases and command-line overrides) to a validated `Recipe`.

Every problem is reported with the position of the offending item in the file that wrote it, so a value
inherited through `extends` points into the base file, and a `--set` value points at the flag.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dgrun.errors import Position, Problem, RecipeError, format_location, validation_message
from dgrun.gitinfo import work_tree
from dgrun.recipe import NESTED_MODELS, Recipe, model_at, recipe_form
from dgrun.variants import apply_variant
from dgrun.yamlio import DataPath, Document, SourceMap, load_file, parse_scalar

MAX_EXTENDS_DEPTH = 16


@dataclass
class LoadedRecipe:
    """A validated recipe with the positions of everything in it (for planner errors) and its file."""

    recipe: Recipe
    source: SourceMap
    path: Path

    def problem(self, path: DataPath, message: str, key: bool = False) -> Problem:
        return Problem(self.source.locate(path, key=key), format_location(path), message)


def load_recipe(path: Path, sets: list[str] = (), optimize: str | None = None) -> LoadedRecipe:
    """Load, merge, override and validate; raise RecipeError listing every problem."""
    path = Path(path)
    document = _load_with_extends(path, [], str(path), repository_root(path))
    data, source = document.data, document.source
    problems: list[Problem] = []
    for index, assignment in enumerate(sets):
        try:
            apply_set(data, source, assignment, index)
        except RecipeError as error:
            problems.extend(error.problems)
    if optimize is not None:
        try:
            flag_position = Position(f"<--optimize {optimize}>")
            edits = parse_optimize_edits(optimize)
            if edits is None:
                data["optimize"] = parse_optimize_shorthand(optimize)
                source.replace_subtree(("optimize",), SourceMap(values={("optimize",): flag_position}))
            else:
                apply_optimize_edits(data, source, edits, flag_position)
        except ValueError as exc:
            problems.append(Problem(Position(f"<--optimize {optimize}>"), "optimize", str(exc)))
        except RecipeError as error:
            flag = Position(f"<--optimize {optimize}>")
            problems.extend(Problem(flag, "optimize", p.message) for p in error.problems)
    if problems:
        raise RecipeError(problems)
    data.pop("extends", None)
    try:
        recipe = validate(data, source, echo_file=str(path))
    except RecipeError as error:
        raise _with_value_problems(error, document.problems) from None
    if document.problems:
        raise RecipeError(document.problems, document=(data, source))
    return LoadedRecipe(recipe, source, path)


def _with_value_problems(error: RecipeError, value_problems: list[Problem]) -> RecipeError:
    """Validation problems plus the values YAML already refused (one line per position, theirs first)."""
    taken = {p.position for p in value_problems}
    kept = [p for p in error.problems if p.position not in taken]
    return RecipeError([*value_problems, *kept], document=error.document)


def recipe_from_resolved(data: dict[str, Any], origin: str) -> Recipe:
    """Rebuild a recipe from a run record's resolved form (used by reproduce and bench)."""
    return validate(recipe_form(data), SourceMap(default=Position(origin)))


def repository_root(recipe: Path) -> Path:
    """What a recipe may read through `extends`: its git work tree, else its own directory tree."""
    directory = recipe.resolve().parent
    return work_tree(directory) or directory


def _load_with_extends(path: Path, chain: list[Path], display: str, root: Path) -> Document:
    document = load_file(path, display)
    data = document.data
    if data is None:
        raise RecipeError([Problem(Position(display), "", "the file is empty; a recipe is a mapping")])
    if not isinstance(data, dict):
        kind = type(data).__name__
        message = f"a recipe is a mapping of keys (dgrun, name, model, ...), not a {kind}"
        raise RecipeError([Problem(document.source.locate(()), "", message)])
    base_name = data.get("extends")
    if base_name is None:
        return document
    base_path = _base_path(base_name, path, root, document.source)
    here = path.resolve()
    if base_path in (*chain, here):
        cycle = " -> ".join(p.name for p in (*chain, here, base_path))
        raise RecipeError([_problem(document.source, ("extends",), f"extends cycle: {cycle}")])
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError([_problem(document.source, ("extends",), "extends chain is too deep")])
    base = _load_with_extends(base_path, [*chain, here], _display_path(base_path), root)
    base.data.pop("extends", None)
    merged = _deep_merge(base.data, data, base.source, document.source, ())
    return Document(merged, base.source, base.problems + document.problems)


def _base_path(base_name: Any, path: Path, root: Path, source: SourceMap) -> Path:
    """The base recipe `extends` names: a .yaml/.yml file inside the recipe's repository, or an error that
    names the path and never shows what is in it."""

    def refuse(message: str) -> RecipeError:
        return RecipeError([_problem(source, ("extends",), message)])

    if not isinstance(base_name, str) or not base_name.strip():
        raise refuse("must be a relative path to a recipe")
    if Path(base_name).is_absolute() or base_name.startswith("~"):
        raise refuse("must be relative to this file")
    if Path(base_name).suffix.lower() not in (".yaml", ".yml"):
        raise refuse(f"base recipe {base_name!r} is not a .yaml or .yml file")
    base_path = (path.parent / base_name).resolve()
    if root != base_path.parent and root not in base_path.parents:
        raise refuse(
            f"base recipe {base_name!r} ({base_path}) is outside this recipe's repository ({root}); "
            "a recipe may extend only files of its own repository"
        )
    if not base_path.is_file():
        raise refuse(f"base recipe {base_name!r} not found (looked at {base_path})")
    return base_path


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _deep_merge(
    base: dict, override: dict, base_src: SourceMap, over_src: SourceMap, prefix: DataPath
) -> dict:
    """Mappings merge key by key; lists and scalars replace. Positions follow the value that wins."""
    result = dict(base)
    for key, value in override.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value, base_src, over_src, path)
            if path in over_src.keys:
                base_src.keys[path] = over_src.keys[path]
        else:
            result[key] = value
            n = len(path)
            subtree = SourceMap(
                values={p: v for p, v in over_src.values.items() if p[:n] == path},
                keys={p: v for p, v in over_src.keys.items() if p[:n] == path},
            )
            base_src.replace_subtree(path, subtree)
    return result


def _problem(source: SourceMap, path: DataPath, message: str, key: bool = False) -> Problem:
    return Problem(source.locate(path, key=key), format_location(path), message)


def apply_set(data: dict, source: SourceMap, assignment: str, index: int = 0) -> None:
    """Apply one `--set key.path=value` (value read as YAML) to the merged recipe data."""
    flag = Position(f"<--set {assignment}>")
    key_path, sep, raw = assignment.partition("=")
    if not sep or not key_path.strip():
        raise RecipeError([Problem(flag, "", "expected KEY.PATH=VALUE, e.g. generate.steps=4")])
    raw_parts = key_path.strip().split(".")
    if any(not re.fullmatch(r"[A-Za-z0-9_]+", p, re.ASCII) for p in raw_parts):
        message = (
            f"bad key path {key_path!r}: dotted names and list indexes, e.g. generate.steps or prompts.0"
        )
        raise RecipeError([Problem(flag, "", message)])
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in raw_parts]
    if parts[0] == "extends":
        raise RecipeError([Problem(flag, "extends", "cannot be set from the command line; edit the recipe")])
    try:
        value = parse_scalar(raw, flag.file)
    except RecipeError as error:
        raise RecipeError([Problem(flag, key_path, p.message) for p in error.problems]) from None
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
            continue
        if not isinstance(target, dict):
            where = format_location(tuple(parts[:depth]))
            raise RecipeError([Problem(flag, key_path, f"{where} is not a mapping")])
        target = target.setdefault(part, {})
    last = parts[-1]
    in_list = isinstance(target, list) and isinstance(last, int) and last < len(target)
    if in_list or isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError([Problem(flag, key_path, "cannot set a value here")])
    source.replace_subtree(tuple(parts), SourceMap(values={tuple(parts): flag}))


_SPLIT_RE = re.compile(r",(?![^\[\]{}]*[\]}])")


def parse_optimize_shorthand(text: str) -> list[str | dict[str, Any]]:
    """`deepcache:interval=2,branch_id=1,compile` → [{deepcache: {interval: 2, branch_id: 1}}, compile].

    A comma-separated token with `=` but no `:` adds a parameter to the step before it; values are read
    as YAML (`backend=[flash,native]` is a list).
    """
    steps: list[str | dict[str, Any]] = []
    for token in (t.strip() for t in _SPLIT_RE.split(text)):
        if not token:
            continue
        name, colon, rest = token.partition(":")
        if colon and "=" not in name:
            params: dict[str, Any] = {}
            steps.append({name.strip(): params})
            assignments = [rest] if rest.strip() else []
        elif "=" in token and steps and isinstance(steps[-1], dict):
            params = next(iter(steps[-1].values()))
            assignments = [token]
        elif "=" in token:
            raise ValueError(f"parameter {token!r} does not follow a `step:` item")
        else:
            steps.append(token)
            continue
        for assignment in assignments:
            key, eq, raw = assignment.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"expected key=value after {name!r}, got {assignment!r}")
            if key.strip() in params:
                step = next(iter(steps[-1])) if isinstance(steps[-1], dict) else name
                raise ValueError(f"parameter {key.strip()!r} is given twice for step {step.strip()!r}")
            params[key.strip()] = parse_scalar(raw, "<--optimize>")
    return steps


def parse_optimize_edits(text: str) -> list[tuple[str, str | dict[str, Any]]] | None:
    """`+compile:mode=max-autotune,-vae_tiling` → [("+", {compile: {...}}), ("-", "vae_tiling")].

    None when no step carries a `+` or `-` (the plain form, which replaces the recipe's steps).
    """
    tokens = [t.strip() for t in _SPLIT_RE.split(text) if t.strip()]
    steps = [t for t in tokens if not ("=" in t and ":" not in t.partition("=")[0])]
    marked = [t[:1] in ("+", "-") for t in steps]
    if not any(marked):
        return None
    if not all(marked):
        raise ValueError(
            "either list the steps (replacing the recipe's) or edit them with +STEP / -STEP, not both"
        )
    plain = ",".join(t[1:] if t in steps else t for t in tokens)
    parsed = parse_optimize_shorthand(plain)
    edits: list[tuple[str, str | dict[str, Any]]] = []
    for token, item in zip(steps, parsed, strict=True):
        if token[0] == "-" and not isinstance(item, str):
            raise ValueError(f"{token!r}: removing a step takes no parameters")
        edits.append((token[0], item))
    return edits


def apply_optimize_edits(
    data: dict[str, Any], source: SourceMap, edits: list[tuple[str, str | dict[str, Any]]], flag: Position
) -> None:
    """Append (+) and remove (-) steps of the recipe's `optimize`, keeping the file positions of the rest."""
    current = data.get("optimize")
    items: list[tuple[Any, int | None]] = [
        (item, i) for i, item in enumerate(current if isinstance(current, list) else [])
    ]

    def name_of(item: Any) -> Any:
        return item if isinstance(item, str) else next(iter(item), None) if isinstance(item, dict) else None

    for op, item in edits:
        name = name_of(item)
        present = [position for position, (existing, _) in enumerate(items) if name_of(existing) == name]
        if op == "-":
            if not present:
                raise ValueError(f"-{name}: the recipe has no step {name!r} to remove")
            del items[present[0]]
        elif present:
            raise ValueError(
                f"+{name}: the recipe already has step {name!r}; use -{name},+{name}:... to change it"
            )
        else:
            items.append((item, None))
    old = SourceMap(dict(source.values), dict(source.keys))
    source.replace_subtree(("optimize",), SourceMap(values={("optimize",): source.locate(("optimize",))}))
    for new_index, (_, origin) in enumerate(items):
        if origin is None:
            source.values[("optimize", new_index)] = flag
            continue
        for table, old_table in ((source.values, old.values), (source.keys, old.keys)):
            for path, position in old_table.items():
                if path[:2] == ("optimize", origin):
                    table[("optimize", new_index, *path[2:])] = position
    data["optimize"] = [item for item, _ in items]


def validate(data: dict[str, Any], source: SourceMap, echo_file: str | None = None) -> Recipe:
    """Validate merged data, then each variant merged onto it; map pydantic errors to positions.

    Values are repeated in messages only when they come from `echo_file` (the recipe the user named).
    """
    problems = _duplicate_names(data, source)
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems.extend(_translate(error, source, (), echo_file=echo_file, data=data))
    variants = data.get("variants")
    if recipe is not None and isinstance(variants, list):
        for index, variant in enumerate(recipe.variants):
            merged = apply_variant(data, variant.overrides())
            try:
                Recipe.model_validate(merged)
            except ValidationError as error:
                located = _translate(error, source, ("variants", index), variant.overrides(), echo_file)
                problems.extend(p for p in located if p not in problems)
    if problems:
        raise RecipeError(problems, document=(data, source))
    assert recipe is not None
    return recipe


def _duplicate_names(data: dict[str, Any], source: SourceMap) -> list[Problem]:
    """Prompt ids and variant names must be unique; point at the second use."""
    problems = []
    for field, key, reserved in (("prompts", "id", None), ("variants", "name", "baseline")):
        items = data.get(field)
        seen: dict[Any, int] = {}
        for index, item in enumerate(items if isinstance(items, list) else []):
            value = item.get(key) if isinstance(item, dict) else None
            if not isinstance(value, str):
                continue  # missing or of the wrong type: validation reports it
            path = (field, index, key)
            if value == reserved:
                problems.append(_problem(source, path, f"{value!r} is reserved for the automatic baseline"))
            elif value in seen:
                message = f"{key} {value!r} is already used by {field}[{seen[value]}]"
                problems.append(_problem(source, path, message))
            else:
                seen[value] = index
    return problems


def _translate(
    error: ValidationError,
    source: SourceMap,
    variant: DataPath,
    overrides: dict | None = None,
    echo_file: str | None = None,
    data: Any = None,
) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        loc: DataPath = tuple(item["loc"])
        if variant and overrides is not None:
            if loc and loc[0] in overrides:
                loc = (*variant, *loc)
            else:
                continue  # the base recipe's own problem, reported once already
        kind = item["type"]
        if kind == "missing":
            parent = loc[:-1]
            problems.append(
                Problem(source.locate(parent), format_location(parent), f"missing key {loc[-1]!r}")
            )
        elif kind == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}{_suggest(loc)}"
            problems.append(Problem(source.locate(loc, key=True), format_location(loc[:-1]), message))
        else:
            position = source.locate(loc)
            message = _empty_section_message(loc, item, data) or validation_message(
                item, echo=echo_file is None or position.file == echo_file
            )
            problems.append(Problem(position, format_location(loc), message))
    return problems


def _empty_section_message(loc: DataPath, item: dict[str, Any], data: Any) -> str | None:
    """`model:` with nothing indented under it: say so, and which of its keys sit at the top level."""
    if item.get("input") is not None or loc not in (("model",), ("generate",), ("output",)):
        return None
    model = model_at(loc)
    stray = [k for k in (data if isinstance(data, dict) else {}) if k in model.model_fields]
    if stray:
        keys = ", ".join(stray)
        return (
            f"is empty, and {keys} sit{'s' if len(stray) == 1 else ''} at the top level: indent "
            f"{'it' if len(stray) == 1 else 'them'} under `{loc[0]}:`"
        )
    return f"is empty; give it a mapping, with its keys indented under `{loc[0]}:`"


def _suggest(loc: DataPath) -> str:
    model = model_at(tuple(p for p in loc[:-1] if not (isinstance(p, str) and p == "params")))
    if model is None:
        return ""
    if model is Recipe and len(loc) == 1:
        owners = [
            name for name, nested in NESTED_MODELS[Recipe].items() if str(loc[0]) in nested.model_fields
        ]
        if owners and owners[0] not in ("variants", "optimize", "prompts"):
            return f"; it belongs under `{owners[0]}:` (indent it below `{owners[0]}:`)"
    names = [n for n in model.model_fields if n != "params"]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; allowed: {', '.join(names)}"
