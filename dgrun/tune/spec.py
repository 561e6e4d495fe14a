"""The recipe's `tune:` section: what `dgrun tune` searches, what it optimises, and what it must keep.

```yaml
tune:
  objective: latency          # latency (median s/image) | throughput (images/s) | peak_memory
  constraints: {psnr_min: 30, ssim_min: 0.95, adherence_min: 1.0, peak_memory_max: 8GiB}
  space:                      # ordered like optimize; a list of values is a choice
    - deepcache: {interval: [2, 3, 5], branch_id: [0, 3], optional: true}
    - compile: {mode: [default, max-autotune-no-cudagraphs], optional: true}
  generate: {batch_size: [1, 4, 8]}
  trials: 24
  sampler: tpe                # tpe | random | grid
  seed: 0
```

A parameter whose own type is a list takes its choices as a list of lists (`backend: [[flash, native],
[native]]`). Steps and choices are checked against the installed steps by the planner (`space_problems`),
so a bad choice is a `dgrun check` error at its line.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def parse_bytes(value: Any) -> int:
    """`8GiB`, `512 MB`, or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a memory size is a number of bytes or a string like 8GiB")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not isinstance(value, str) or not match:
        raise ValueError(f"{value!r} is not a memory size; write e.g. 8GiB, 512MB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    unit = unit if unit.endswith("b") or not unit else unit + "b"
    return int(number * SIZE_UNITS[unit])


class TuneConstraints(_Closed):
    """What an accepted trial must keep, measured against the automatic baseline on the recipe's prompts."""

    psnr_min: float | None = Field(
        None, gt=0, le=200, description="worst image's PSNR against the baseline, dB"
    )
    ssim_min: float | None = Field(None, ge=-1, le=1, description="mean SSIM against the baseline")
    adherence_min: float | None = Field(
        None,
        ge=0,
        le=1,
        description="prompt adherence, where the model has an evaluator (dgrun:default, default-dit)",
    )
    peak_memory_max: int | str | None = Field(None, description="peak memory, e.g. 8GiB")

    @field_validator("peak_memory_max")
    @classmethod
    def _bytes(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_bytes(value)
        return value

    def memory_bytes(self) -> int | None:
        return None if self.peak_memory_max is None else parse_bytes(self.peak_memory_max)


class SpaceStep(_Closed):
    """One step of the search space: fixed params, params with choices, and whether it may be left out."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    params: dict[str, Any] = Field(default_factory=dict)
    optional: bool = False

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if not isinstance(v, list)}

    def choices(self) -> dict[str, list[Any]]:
        return {k: v for k, v in self.params.items() if isinstance(v, list)}


def _space_item(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}
    if (
        isinstance(value, dict)
        and len(value) > 1
        and "name" in value
        and set(value) <= {"name", "params", "optional"}
    ):
        return value  # the resolved form a record keeps
    if isinstance(value, dict) and len(value) == 1:
        ((name, params),) = value.items()
        params = dict(params or {}) if isinstance(params, dict) or params is None else params
        if not isinstance(params, dict):
            raise ValueError(f"the choices of step {name!r} are a mapping like {{{name}: {{param: [a, b]}}}}")
        optional = params.pop("optional", False)
        return {"name": name, "params": params, "optional": optional}
    if isinstance(value, dict):
        raise ValueError("a space item is a step name or a one-key mapping {step: {param: choices}}")
    return value


class TuneSpec(_Closed):
    """`tune:`: the search of `dgrun tune` (ignored by run and bench)."""

    objective: Literal["latency", "throughput", "peak_memory"] = "latency"
    constraints: TuneConstraints = Field(default_factory=TuneConstraints)
    space: list[SpaceStep] = Field(min_length=1, max_length=32)
    generate: dict[str, list[Any]] = Field(default_factory=dict, description="choices over generate keys")
    trials: int = Field(24, ge=1, le=10_000)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("space", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        return [_space_item(item) for item in value] if isinstance(value, list) else value

    @field_validator("space")
    @classmethod
    def _distinct(cls, value: list[SpaceStep]) -> list[SpaceStep]:
        names = [step.name for step in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"step {twice[0]!r} appears twice in the space")
        return value

    @field_validator("generate")
    @classmethod
    def _generate_choices(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from dgrun.recipe import GenerateSpec

        problems = []
        for key, choices in value.items():
            if key not in GenerateSpec.model_fields or key == "extra":
                problems.append(f"{key!r} is not a generate key that can be searched")
                continue
            if not choices:
                problems.append(f"{key}: give at least one choice")
            for choice in choices:
                try:
                    GenerateSpec.model_validate({key: choice})
                except ValidationError as error:
                    message = str(error.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")
                    problems.append(f"{key} choice {choice!r}: {message}")
        if problems:
            raise ValueError("; ".join(problems))
        return value


def space_problems(spec: TuneSpec, registry: Any, source: Any) -> list[Any]:
    """Steps of the space that are not installed, and choices their step's params refuse (with positions)."""
    from dgrun.errors import Problem, format_location, validation_message

    problems = []

    def problem(path: tuple[Any, ...], message: str) -> None:
        problems.append(Problem(source.locate(path), format_location(path), message))

    for index, step in enumerate(spec.space):
        path: tuple[Any, ...] = ("tune", "space", index)
        info = registry.get(step.name)
        if info is None:
            problem(
                path,
                registry.clash_message(step.name) or f"unknown step {step.name!r}; `dgrun steps` lists them",
            )
            continue
        fixed, choices = step.fixed(), step.choices()
        candidates = [
            (param, position, value)
            for param, values in choices.items()
            for position, value in enumerate(values)
        ]
        for param, values in choices.items():
            if not values:
                problem((*path, step.name, param), "give at least one choice")
        for param, position, value in candidates or [(None, None, None)]:
            data = dict(fixed) if param is None else {**fixed, param: value}
            try:
                info.cls.Params.model_validate(data)
            except ValidationError as error:
                for item in error.errors(include_url=False):
                    where = (*path, step.name, *item["loc"])
                    if param is not None and tuple(item["loc"][:1]) == (param,):
                        where = (*path, step.name, param, position)
                    problem(where, validation_message(item))
    return problems
