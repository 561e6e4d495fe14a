"""Error types shared by the loader, the planner and the runner.

Bad input is collected as `Problem`s (all at once, each with a source position) and raised together as one
`RecipeError`; `dgrun.cli` turns them into `FILE:LINE:COL: location: message` lines and exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Position:
    """Where a value came from: a file (or a command-line flag) and a 1-based line and column."""

    file: str
    line: int = 1
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located at the offending item."""

    position: Position
    location: str
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{self.position}: {where}{self.message}"


class DgrunError(Exception):
    """Base class of the errors dgrun reports to a user without a traceback."""


class RecipeError(DgrunError):
    """The recipe, a flag or a path is bad input (exit code 2); carries every problem found."""

    def __init__(self, problems: list[Problem], document: Any = None):
        self.problems = sorted(problems, key=lambda p: (p.position.file, p.position.line, p.position.column))
        # (data, source map) of a recipe that failed validation, so its steps can still be checked.
        self.document = document
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(DgrunError):
    """Bad command-line usage or paths that have no recipe position (exit code 2)."""


class PluginError(DgrunError):
    """Plugins disagree (e.g. two optimizers with one name) — the step registry cannot be built."""


class RunError(DgrunError):
    """A run started and failed (exit code 1); the run record is kept."""


class OutputWriteError(RunError):
    """An image or run.json could not be written (a full disk, an I/O error): the run fails, recorded."""

    def __init__(self, file: str, directory: Any, error: OSError):
        self.error = error
        reason = error.strerror or type(error).__name__
        super().__init__(f"cannot write {file} in {directory}: {reason} (errno {error.errno})")


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM: stop like Ctrl-C (record `interrupted`, keep finished images), exit 143."""


class ModelLoadError(RunError):
    """The model could not be loaded (unreachable hub id, missing directory, wrong pipeline class)."""


def format_location(path: tuple[str | int, ...]) -> str:
    """Render a data path like ('optimize', 2, 'deepcache') as `optimize[2].deepcache`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


_TYPE_ERRORS = (
    "string_type",
    "int_type",
    "float_type",
    "bool_type",
    "dict_type",
    "list_type",
    "literal_error",
)


def validation_message(item: dict, echo: bool = True) -> str:
    """A pydantic error item as a user-facing message, saying what was given for type errors.

    `echo=False` names only the type: a value read from another file (a base reached through `extends`)
    is never repeated back.
    """
    message = str(item["msg"]).removeprefix("Value error, ")
    if item.get("type") in _TYPE_ERRORS:
        value = repr(item.get("input"))
        value = value if len(value) <= 40 else value[:37] + "..."
        given = type(item.get("input")).__name__
        message += f" (got {given} {value})" if echo else f" (got a {given})"
    return message
