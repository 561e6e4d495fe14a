"""The recipe format as JSON Schema with every installed step's own parameters, for editors and for
`dgrun steps NAME`.

The pydantic models describe a step item only as "a name or a one-key mapping", because which steps exist
is known only once the plugins are loaded. Here each installed step becomes a branch of its own, so
yaml-language-server completes step names and validates (and completes) their parameters.
"""

from __future__ import annotations

import copy
from typing import Any

from dgrun.plugins import Registry

ON_UNAVAILABLE = {"enum": ["fail", "skip"], "description": "what this step does where it cannot run"}


def recipe_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema (2020-12) of a recipe, with one `optimize` item schema per installed step."""
    from dgrun.recipe import Recipe

    document = Recipe.model_json_schema()
    definitions = document.setdefault("$defs", {})
    branches: list[dict[str, Any]] = [
        {"enum": sorted(registry.optimizers), "description": "a step, default params"}
    ]
    for name in sorted(registry.optimizers):
        params = step_params_schema(name, registry, definitions)
        params.setdefault("properties", {})["on_unavailable"] = ON_UNAVAILABLE
        branches.append(
            {
                "type": "object",
                "properties": {name: {"anyOf": [params, {"type": "null"}]}},
                "required": [name],
                "additionalProperties": False,
                "description": registry.optimizers[name].cls.summary,
            }
        )
    definitions["StepItem"] = {"anyOf": branches}
    document["properties"]["optimize"] = {
        "type": "array",
        "items": {"$ref": "#/$defs/StepItem"},
        "description": "ordered; applied top to bottom",
    }
    variant = definitions.get("VariantSpec", {}).get("properties", {})
    if "optimize" in variant:
        variant["optimize"] = {
            "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/StepItem"}}, {"type": "null"}]
        }
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "dgrun recipe (format 1)"
    return document


def step_params_schema(
    name: str, registry: Registry, definitions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One step's params as JSON Schema; nested definitions move into `definitions`, prefixed by the step."""
    info = registry.optimizers[name]
    schema = copy.deepcopy(info.cls.Params.model_json_schema(by_alias=True))
    nested = schema.pop("$defs", {})
    prefix = "".join(part.title() for part in name.split("_"))
    renames = {key: f"{prefix}{key}" for key in nested}
    schema = _renamed(schema, renames)
    if definitions is not None:
        for key, value in nested.items():
            definitions[renames[key]] = _renamed(value, renames)
    else:
        schema["$defs"] = {renames[key]: _renamed(value, renames) for key, value in nested.items()}
    schema["additionalProperties"] = False
    return schema


def _renamed(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        result = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                target = value.removeprefix("#/$defs/")
                result[key] = f"#/$defs/{renames.get(target, target)}"
            else:
                result[key] = _renamed(value, renames)
        return result
    if isinstance(node, list):
        return [_renamed(item, renames) for item in node]
    return node


def describe_params(name: str, registry: Registry) -> list[tuple[str, list[tuple[str, ...]]]]:
    """Tables of one step's parameters, as `dgrun steps NAME` prints them: the step's own, then one per nested
    mapping (e.g. compile's `inductor` flags). Rows: parameter, type, default, range, description."""
    schema = step_params_schema(name, registry)
    definitions = schema.get("$defs", {})
    sections = [("parameters", _rows(schema, definitions))]
    for parameter, spec in schema.get("properties", {}).items():
        for option in [spec, *spec.get("anyOf", [])]:
            if "$ref" in option:
                nested = definitions.get(option["$ref"].rsplit("/", 1)[-1], {})
                sections.append((f"{parameter} (a mapping of these keys)", _rows(nested, definitions)))
    return sections


def _rows(schema: dict[str, Any], definitions: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (parameter, _type(spec, definitions), _default(spec), _range(spec), spec.get("description", ""))
        for parameter, spec in schema.get("properties", {}).items()
    ]


def _type(spec: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "$ref" in spec:
        return "mapping (keys below)"
    if "enum" in spec:
        return " | ".join(map(str, spec["enum"]))
    if "const" in spec:
        return str(spec["const"])
    if "anyOf" in spec:
        return " | ".join(_type(option, definitions) for option in spec["anyOf"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}), definitions)}"
    return str(kind)


def _default(spec: dict[str, Any]) -> str:
    if "default" not in spec:
        return "(required)"
    default = spec["default"]
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def _range(spec: dict[str, Any]) -> str:
    options = [spec, *spec.get("anyOf", [])]
    bounds = []
    for option in options:
        for key, symbol in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        ):
            if key in option:
                bounds.append(f"{symbol} {option[key]}")
        for key, word in (("minItems", "items >="), ("maxItems", "items <="), ("pattern", "matches")):
            if key in option:
                bounds.append(f"{word} {option[key]}")
    return ", ".join(bounds)
