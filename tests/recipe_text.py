"""Helpers for the recipe-loading tests: write recipe text, load it, and locate the expected problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dgrun.errors import Problem, RecipeError
from dgrun.loading import load_recipe

VALID = """\
dgrun: 1
name: demo
model:
  id: dgrun:tiny-sd
prompts:
  - a red circle
"""


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of_path(path: Path, **kwargs) -> list[Problem]:
    """Load `path` and return the problems it must be rejected with."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, **kwargs)
    assert info.value.problems, "a RecipeError must carry at least one problem"
    return info.value.problems


def problems_of(text: str, name: str = "recipe.yaml", **kwargs) -> list[Problem]:
    """Write `text` as a recipe, load it, and return the problems it must be rejected with."""
    return problems_of_path(write(name, text), **kwargs)


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def where(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the `occurrence`-th appearance of `needle` in `text`."""
    text = textwrap.dedent(text)
    start = -1
    for _ in range(occurrence):
        start = text.index(needle, start + 1)
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return line, column


def value_at(text: str, entry: str) -> tuple[int, int]:
    """Line and column of the value in the first `key: value` line equal to `entry`."""
    key = entry.partition(": ")[0]
    line, column = where(text, entry)
    return line, column + len(key) + 2


def assert_at(problem: Problem, file: str, line: int, column: int | None = None) -> None:
    assert problem.position.file == file, str(problem)
    assert problem.position.line == line, str(problem)
    if column is not None:
        assert problem.position.column == column, str(problem)
