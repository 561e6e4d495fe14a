"""The recipe format (docs/recipes.md) as pydantic v2 models, strict and closed (`extra="forbid"`) everywhere.

Step parameters are validated later by the planner, against the params model of the optimizer that the
plugin registry resolves the step name to; here a step is only checked to be a name or a one-key mapping.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import re
import string
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from dgrun.tune.spec import SpaceStep, TuneConstraints, TuneSpec

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
STEP_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
PROMPT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
OUTPUT_PLACEHOLDERS = ("name", "hash")

OnUnavailable = Literal["fail", "skip"]


class Strict(BaseModel):
    """Base for every recipe model: unknown keys are errors, and `"3"` is not a number."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSpec(Strict):
    """Which pipeline to load, and how."""

    id: str = Field(
        min_length=1, description="diffusers repo id, local directory, or a built-in `dgrun:` model"
    )
    pipeline: str = Field(
        "auto", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="a diffusers pipeline class name, or auto"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    revision: str | None = None
    variant: str | None = None
    trust_remote_code: bool = Field(False, description="honoured only with the CLI flag --trust-remote-code")

    @field_validator("id")
    @classmethod
    def _builtin_exists(cls, value: str) -> str:
        from dgrun.models import BUILTIN_PREFIX, builtin_model, unknown_builtin_message

        if value.startswith(BUILTIN_PREFIX) and builtin_model(value) is None:
            raise ValueError(unknown_builtin_message(value))
        return value

    @field_validator("pipeline")
    @classmethod
    def _pipeline_matches_builtin(cls, value: str, info: ValidationInfo) -> str:
        from dgrun.models import builtin_model

        model_id = info.data.get("id")
        builtin = builtin_model(model_id) if isinstance(model_id, str) else None
        if builtin is not None and value not in ("auto", builtin.pipeline_class):
            raise ValueError(
                f"{value!r} does not apply to {model_id}, which is a {builtin.pipeline_class}; "
                "remove model.pipeline (or set it to auto)"
            )
        return value


class GenerateSpec(Strict):
    """Arguments of the pipeline call, and the seed schedule."""

    steps: int = Field(20, ge=1, le=10_000)
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=100,
        description="null: the pipeline's own default; CFG scales above ~30 only add noise",
    )
    width: int | None = Field(
        None, ge=8, le=16384, multiple_of=8, description="null: the model's native size"
    )
    height: int | None = Field(
        None, ge=8, le=16384, multiple_of=8, description="null: the model's native size"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="prompt i without its own seed uses seed + i")
    batch_size: int = Field(1, ge=1, le=4096, description="prompts per pipeline call")
    images_per_prompt: int = Field(1, ge=1, le=1024)
    negative_prompt: str | None = None
    warmup: int = Field(0, ge=0, le=1000, description="untimed warmup calls before the first timed image")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU intra-op threads (null: torch's default); CPU images depend on the count, which the "
        "record keeps and `dgrun reproduce` restores",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="extra keyword arguments to the pipeline call: named parameters of the pipeline's "
        "__call__ that dgrun does not set itself (checked by the planner)",
    )


# Pipeline-call arguments dgrun sets itself (the recipe's own keys say them), or that break the runner.
RESERVED_EXTRA = {
    "prompt": "write prompts under `prompts:`",
    "prompt_2": "dgrun passes one prompt per image",
    "prompt_3": "dgrun passes one prompt per image",
    "negative_prompt": "use generate.negative_prompt or a prompt's `negative`",
    "num_inference_steps": "use generate.steps",
    "guidance_scale": "use generate.guidance_scale",
    "width": "use generate.width",
    "height": "use generate.height",
    "generator": "dgrun seeds one generator per prompt (generate.seed, a prompt's `seed`)",
    "num_images_per_prompt": "use generate.images_per_prompt",
    "output_type": "dgrun writes PNG images",
    "return_dict": "dgrun reads the pipeline's output object",
    "callback": "a recipe cannot name code",
    "callback_steps": "a recipe cannot name code",
    "callback_on_step_end": "a recipe cannot name code",
    "callback_on_step_end_tensor_inputs": "a recipe cannot name code",
}
# Tensor or image inputs: a recipe holds plain values, which these arguments cannot take.
TENSOR_EXTRA_SUFFIXES = ("latents", "_embeds", "image", "mask_image", "control_image")


def extra_key_problem(key: str) -> str | None:
    """Why `generate.extra.KEY` is refused before the pipeline is known, or None."""
    if not key.isidentifier() or key.startswith("_"):
        return f"{key!r} is not a pipeline argument name"
    if key in RESERVED_EXTRA:
        return f"{key!r} is set by dgrun itself; {RESERVED_EXTRA[key]}"
    if key.endswith(TENSOR_EXTRA_SUFFIXES):
        return f"{key!r} takes tensors or images, which a recipe cannot hold"
    return None


class PromptSpec(Strict):
    """One prompt; a bare string in the recipe is shorthand for `{text: ...}`."""

    text: str = Field(min_length=1)
    id: str | None = Field(None, pattern=PROMPT_ID_PATTERN, max_length=80)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative: str | None = None


def _prompt_item(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


def _step_item(value: Any) -> Any:
    """Normalise `name` / `{name: params-or-null}` to the StepSpec fields."""
    if isinstance(value, str):
        return {"name": value, "params": {}}
    if isinstance(value, dict):
        if len(value) != 1:
            names = ", ".join(map(str, value)) or "nothing"
            raise ValueError(
                f"a step mapping has exactly one key, the step name (found {names}); "
                "put each step in its own list item"
            )
        ((name, params),) = value.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(
                f"the parameters of step {name!r} must be a mapping like {{{name}: {{key: value}}}}, "
                f"not {type(params).__name__}"
            )
        params = dict(params)
        result: dict[str, Any] = {"name": name, "params": params}
        if "on_unavailable" in params:
            result["on_unavailable"] = params.pop("on_unavailable")
        return result
    if isinstance(value, StepSpec):
        return value
    raise ValueError(f"a step is a name or a one-key mapping {{name: params}}, not {type(value).__name__}")


class StepSpec(Strict):
    """One optimization step as written: its name, raw params and its `on_unavailable` override."""

    name: str = Field(pattern=STEP_NAME_PATTERN, description="snake_case step name")
    params: dict[str, Any] = Field(default_factory=dict)
    on_unavailable: OnUnavailable | None = None

    def as_item(self) -> str | dict[str, Any]:
        """The recipe form of this step (bare name when it has no params)."""
        params = dict(self.params)
        if self.on_unavailable is not None:
            params["on_unavailable"] = self.on_unavailable
        return {self.name: params} if params else self.name


PromptItem = Annotated[PromptSpec, BeforeValidator(_prompt_item, json_schema_input_type=str | PromptSpec)]
StepItem = Annotated[
    StepSpec,
    BeforeValidator(_step_item, json_schema_input_type=str | dict[str, dict[str, Any] | None]),
]


class OutputSpec(Strict):
    """Where images and run.json go."""

    dir: str = Field("outputs/{name}", min_length=1, description="relative path; {name} and {hash} allowed")

    @field_validator("dir")
    @classmethod
    def _dir_is_safe(cls, value: str) -> str:
        problem = output_dir_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def output_dir_problem(value: str) -> str | None:
    """Why an `output.dir` template is unusable, or None; everything `dgrun run` would trip on later."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character (a newline, tab or NUL)"
    try:
        fields = [
            (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None
        ]
    except ValueError as exc:
        return f"is not a valid template ({exc}); write {{name}} or {{hash}}, and {{{{ }}}} for braces"
    for name, spec, conversion in fields:
        if name not in OUTPUT_PLACEHOLDERS:
            return f"unknown placeholder {{{name}}}; allowed: {{name}}, {{hash}}"
        if spec or conversion:
            return f"placeholder {{{name}}} takes no format spec or conversion"
    if "~" in value:
        return "must not contain '~' (it is not expanded); give --out for a path in a home directory"
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        return "must be relative to the working directory; give --out for another place"
    parts = re.split(r"[\\/]", value)
    if ".." in parts:
        return "must not leave the working directory ('..')"
    if any(part.lower() == ".git" for part in parts):
        return "must not write inside a .git directory"
    return None


VARIANT_KEYS = ("model", "generate", "optimize", "on_unavailable")
SWEEP_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
MAX_SWEEP_MEMBERS = 100
# The step names of the recipe's own `optimize`, while its variants are validated (see Recipe._variants).
_BASE_STEPS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "base_steps", default=None
)


def _sweep_values(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("give at least one value to sweep over")
    canonical = [json.dumps(v, sort_keys=True) for v in values]
    for index, text in enumerate(canonical):
        if text in canonical[:index]:
            raise ValueError(f"value {values[index]!r} is listed twice")
    return values


SweepValues = Annotated[list[Any], AfterValidator(_sweep_values)]


class VariantSpec(Strict):
    """A named override of parts of the recipe, compared against the baseline by `dgrun bench`.

    `sweep` maps a dotted path to a list of values and expands into one variant per value (per
    combination, with several paths): `STEP.PARAM` sets a parameter of a step in this variant's `optimize`
    (the recipe's when the variant has none); `generate.KEY` and `model.KEY` set a recipe key.
    """

    name: str = Field(pattern=NAME_PATTERN, max_length=80)
    description: str | None = None
    model: dict[str, Any] | None = None
    generate: dict[str, Any] | None = None
    optimize: list[StepItem] | None = None
    on_unavailable: OnUnavailable | None = None
    sweep: dict[str, SweepValues] | None = Field(
        None,
        description="dotted path (STEP.PARAM, generate.KEY or model.KEY) → values; one variant per value",
    )

    @field_validator("sweep")
    @classmethod
    def _sweep_paths_exist(cls, value: dict[str, list[Any]] | None, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if not value:
            raise ValueError("a sweep maps at least one dotted path to its values")
        problems = []
        own = info.data.get("optimize")
        steps = [s.name for s in own] if own is not None else _BASE_STEPS.get()
        where = "this variant's optimize" if own is not None else "the recipe's optimize"
        for key, values in value.items():
            if not SWEEP_KEY_PATTERN.match(key):
                problems.append(f"{key!r}: expected STEP.PARAM, generate.KEY or model.KEY")
                continue
            head, rest = key.split(".", 1)
            if head in ("generate", "model"):
                problems.extend(_check_recipe_values(head, rest, values))
            elif steps is not None and head not in steps:
                listed = ", ".join(steps) or "no steps"
                problems.append(f"{key!r}: no step {head!r} in {where} ({listed})")
        members = 1
        for values in value.values():
            members *= len(values)
        if members > MAX_SWEEP_MEMBERS:
            problems.append(f"expands to {members} variants; at most {MAX_SWEEP_MEMBERS} are allowed")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def overrides(self) -> dict[str, Any]:
        """The recipe keys this variant replaces, in recipe (plain data) form."""
        result: dict[str, Any] = {}
        for key in VARIANT_KEYS:
            value = getattr(self, key)
            if value is not None:
                result[key] = [s.as_item() for s in value] if key == "optimize" else value
        return result


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"the format version is the number 1, not {str(value).lower()}")
    return value


class Recipe(Strict):
    """A whole recipe, after `extends` and command-line overrides have been merged in."""

    dgrun: Annotated[Literal[1], BeforeValidator(_not_a_bool)] = Field(description="recipe format version")
    name: str = Field(pattern=NAME_PATTERN, max_length=80, description="used in output paths")
    description: str | None = None
    extends: str | None = Field(None, description="base recipe, relative to this file")
    model: ModelSpec
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    optimize: list[StepItem] = Field(default_factory=list, description="ordered; applied top to bottom")
    on_unavailable: OnUnavailable = "fail"
    prompts: list[PromptItem] = Field(min_length=1, max_length=100_000)
    output: OutputSpec = Field(default_factory=OutputSpec)
    variants: list[VariantSpec] = Field(default_factory=list)
    tune: TuneSpec | None = Field(None, description="the search of `dgrun tune`; ignored by run and bench")

    @field_validator("variants", mode="wrap")
    @classmethod
    def _variants(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """Let each variant's sweep see the recipe's own steps, so its errors keep their own positions."""
        base = info.data.get("optimize")
        token = _BASE_STEPS.set(tuple(s.name for s in base) if base is not None else None)
        try:
            return handler(value)
        finally:
            _BASE_STEPS.reset(token)

    def resolved(self) -> dict[str, Any]:
        """Plain-data form stored in run records: a valid recipe with every default explicit and `extends`
        already merged, so a run can be repeated from its record or from one of its PNGs alone."""
        data = self.model_dump(mode="json")
        data["extends"] = None
        if data.get("tune") is None:
            data.pop("tune", None)  # a recipe without `tune:` resolves (and hashes) as before tuning existed
        return recipe_form(data)

    def sha256(self) -> str:
        return recipe_hash(self.resolved())


def _check_recipe_values(section: str, key: str, values: list[Any]) -> list[str]:
    """Each swept `generate.KEY` / `model.KEY` value must be valid for that key on its own."""
    model = GenerateSpec if section == "generate" else ModelSpec
    first, _, deeper = key.partition(".")
    if first not in model.model_fields:
        return [f"'{section}.{key}': {section} has no key {first!r}"]
    if deeper:
        return [] if first == "extra" else [f"'{section}.{key}': {section}.{first} has no nested keys"]
    problems = []
    for item in values:
        data = {first: item} if section == "generate" else {"id": "x", first: item}
        try:
            model.model_validate(data)
        except ValidationError as error:
            message = error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            problems.append(f"'{section}.{key}' value {item!r}: {message}")
    return problems


def recipe_form(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe (run.json, a PNG chunk) as recipe data again: steps back to `{name: params}`.

    `resolved()` dumps each step as its StepSpec fields, which a recipe's step list does not accept.
    """
    data = copy.deepcopy(resolved)
    holders = [data, *(v for v in data.get("variants") or [] if isinstance(v, dict))]
    for holder in holders:
        steps = holder.get("optimize")
        if isinstance(steps, list):
            holder["optimize"] = [
                StepSpec.model_validate(s).as_item() if isinstance(s, dict) and "params" in s else s
                for s in steps
            ]
    return data


def recipe_hash(resolved: dict[str, Any]) -> str:
    """Stable hash of a resolved recipe (canonical JSON)."""
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# Nested models by field name, for "did you mean" suggestions on unknown keys.
NESTED_MODELS: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    Recipe: {
        "model": ModelSpec,
        "generate": GenerateSpec,
        "prompts": PromptSpec,
        "output": OutputSpec,
        "variants": VariantSpec,
        "optimize": StepSpec,
        "tune": TuneSpec,
    },
    VariantSpec: {"optimize": StepSpec},
    TuneSpec: {"constraints": TuneConstraints, "space": SpaceStep},
}


def model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The recipe model class that validates the mapping at `path`, if any."""
    current: type[BaseModel] = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        nested = NESTED_MODELS.get(current, {}).get(part)
        if nested is None:
            return None
        current = nested
    return current
