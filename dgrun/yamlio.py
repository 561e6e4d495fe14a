"""Safe YAML loading that remembers where every key and value came from.

Recipes come from other people's repositories, so loading is deliberately narrow: plain scalars, mappings
and sequences only (no tags, no merge keys), duplicate keys are errors, alias expansion and file size are
bounded. The composed node tree is turned into plain Python data here, so every value keeps its line and
column for the error messages (`FILE:LINE:COL`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgrun.errors import Position, Problem, RecipeError
from dgrun.errors import format_location as _location
from dgrun.safeio import NotRegularFile, TooLarge, read_bounded

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 50_000

DataPath = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_ALLOWED_SCALAR_TAGS = {"str", "int", "float", "bool", "null", "timestamp"}


@dataclass
class SourceMap:
    """Positions of values and mapping keys, addressed by their data path."""

    values: dict[DataPath, Position] = field(default_factory=dict)
    keys: dict[DataPath, Position] = field(default_factory=dict)
    default: Position = field(default_factory=lambda: Position("<recipe>"))

    def locate(self, path: DataPath, key: bool = False) -> Position:
        """Position of `path` (its key when `key`), else of the nearest enclosing item that has one."""
        if key and path in self.keys:
            return self.keys[path]
        probe = tuple(path)
        while probe:
            if probe in self.values:
                return self.values[probe]
            if probe in self.keys:
                return self.keys[probe]
            probe = probe[:-1]
        return self.values.get((), self.default)

    def replace_subtree(self, prefix: DataPath, other: SourceMap) -> None:
        """Drop positions under `prefix` and take `other`'s (already rooted at `prefix`)."""
        n = len(prefix)
        for table in (self.values, self.keys):
            for path in [p for p in table if p[:n] == prefix]:
                del table[path]
        self.values.update(other.values)
        self.keys.update(other.keys)


@dataclass
class Document:
    """Plain data (dicts, lists, scalars) plus where each piece came from."""

    data: Any
    source: SourceMap
    # Problems with single values (a non-finite number) that do not stop the rest being checked; the value
    # is replaced by REJECTED, and the loader reports these with everything else it finds.
    problems: list[Problem] = field(default_factory=list)


class _Rejected:
    """Stands in for a value already reported as a problem (never valid anywhere in a recipe)."""

    def __repr__(self) -> str:
        return "<rejected value>"


REJECTED = _Rejected()


def _position(file: str, node: Any) -> Position:
    mark = node.start_mark
    return Position(file, mark.line + 1, mark.column + 1)


class _Builder:
    """Turns a composed ruamel node tree into plain data, collecting problems instead of stopping."""

    def __init__(self, file: str):
        self.file = file
        self.source = SourceMap(default=Position(file))
        self.problems: list[Problem] = []
        self.soft_problems: list[Problem] = []
        self.count = 0
        self.active: set[int] = set()

    def problem(self, node: Any, path: DataPath, message: str) -> None:
        self.problems.append(Problem(_position(self.file, node), _location(path), message))

    def build(self, node: Any, path: DataPath) -> Any:
        from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge(node)
        self.source.values.setdefault(path, _position(self.file, node))
        if id(node) in self.active:
            self.problem(node, path, "recursive alias")
            return None
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        tag = node.tag or ""
        if isinstance(node, SequenceNode):
            if tag not in (f"{_TAG}seq", "!", ""):
                self.problem(node, path, f"YAML tag {tag!r} is not allowed")
                return None
            self.active.add(id(node))
            try:
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            finally:
                self.active.discard(id(node))
        if isinstance(node, MappingNode):
            if tag not in (f"{_TAG}map", "!", ""):
                self.problem(node, path, f"YAML tag {tag!r} is not allowed")
                return None
            self.active.add(id(node))
            try:
                return self.mapping(node, path)
            finally:
                self.active.discard(id(node))
        self.problem(node, path, "unsupported YAML node")
        return None

    def mapping(self, node: Any, path: DataPath) -> dict[str, Any]:
        from ruamel.yaml.nodes import ScalarNode

        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":
                self.problem(key_node, path, "YAML merge keys (<<) are not supported; use `extends:`")
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(key_node, path, "mapping keys must be plain strings")
                continue
            key = key_node.value
            if not _is_unicode(key):
                self.problem(key_node, path, "key contains an invalid \\u escape (a lone UTF-16 surrogate)")
                continue
            if key_node.tag not in (f"{_TAG}str", f"{_TAG}int", f"{_TAG}float", f"{_TAG}bool", f"{_TAG}null"):
                self.problem(key_node, path, f"YAML tag {key_node.tag!r} is not allowed")
                continue
            child = (*path, key)
            if key in result:
                self.problem(
                    key_node, child, f"duplicate key {key!r} (first at line {self.source.keys[child].line})"
                )
                continue
            self.source.keys[child] = _position(self.file, key_node)
            if isinstance(value_node, ScalarNode) and value_node.value == "" and not value_node.style:
                # An empty value (`name:`) has no token of its own; ruamel puts it at the next line.
                end = key_node.end_mark
                self.source.values[child] = Position(self.file, end.line + 1, end.column + 2)
            result[key] = self.build(value_node, child)
        return result

    def scalar(self, node: Any, path: DataPath) -> Any:
        tag = node.tag or ""
        kind = tag[len(_TAG) :] if tag.startswith(_TAG) else None
        value: str = node.value
        if not _is_unicode(value):
            self.problem(node, path, "contains an invalid \\u escape (a lone UTF-16 surrogate)")
            return None
        if kind not in _ALLOWED_SCALAR_TAGS:
            self.problem(node, path, f"YAML tag {tag!r} is not allowed")
            return None
        try:
            if kind == "null":
                return None
            if kind == "bool":
                return value.lower() == "true"
            if kind == "int":
                return _parse_int(value)
            if kind == "float":
                return _parse_float(value)
        except _NonFinite:
            self.soft_problems.append(
                Problem(_position(self.file, node), _location(path), f"{value} is not a finite number")
            )
            return REJECTED
        except ValueError:
            self.problem(node, path, f"cannot read {value!r} as {kind}")
            return None
        return value


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_int(text: str) -> int:
    cleaned = text.replace("_", "")
    try:
        return int(cleaned, 0)
    except ValueError:
        return int(cleaned, 10)


def _parse_float(text: str) -> float:
    """A finite float: infinities and NaN (written, or overflowing like 1e400) silently ruin a run."""
    lowered = text.lower().replace("_", "")
    value = float(lowered.replace(".inf", "inf").replace(".nan", "nan"))
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


class _NonFinite(ValueError):
    """A number YAML reads as infinity or NaN."""


class _TooLarge(Exception):
    def __init__(self, node: Any):
        self.node = node


def load_text(text: str, file: str) -> Document:
    """Parse one YAML document from `text`; raise RecipeError with every problem found."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise RecipeError([Problem(Position(file), "", f"file is larger than {MAX_FILE_BYTES} bytes")])
    if "\0" in text:
        raise RecipeError([Problem(Position(file), "", "file contains a NUL byte; is it a text file?")])
    yaml = YAML(typ="safe", pure=True)
    try:
        node = yaml.compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and "stream end" in str(exc.problem or ""):
            mark = exc.context_mark  # an unclosed bracket or quote: point where it was opened
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file)
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        if "\t" in text and "\\t" in message:
            message += " (tabs cannot indent YAML; use spaces)"
        raise RecipeError([Problem(pos, "", f"YAML syntax error: {message}")]) from None
    except YAMLError as exc:
        raise RecipeError([Problem(Position(file), "", f"YAML error: {exc}")]) from None
    except RecursionError:
        raise RecipeError([Problem(Position(file), "", "document is nested too deeply")]) from None
    if node is None:
        return Document(None, SourceMap(default=Position(file)))
    builder = _Builder(file)
    try:
        data = builder.build(node, ())
    except _TooLarge as too_large:
        pos = _position(file, too_large.node)
        raise RecipeError(
            [Problem(pos, "", f"document expands to more than {MAX_NODES} nodes (an alias bomb?)")]
        ) from None
    except RecursionError:
        raise RecipeError([Problem(Position(file), "", "document is nested too deeply")]) from None
    if builder.problems:
        raise RecipeError(builder.problems + builder.soft_problems)
    return Document(data, builder.source, builder.soft_problems)


def load_file(path: Path, display: str | None = None) -> Document:
    """Read and parse a YAML file (regular, bounded), turning OS errors into a located problem."""
    name = display or str(path)
    try:
        raw = read_bounded(Path(path), MAX_FILE_BYTES, "recipe file")
    except IsADirectoryError:
        raise RecipeError([Problem(Position(name), "", "is a directory, not a recipe file")]) from None
    except FileNotFoundError:
        raise RecipeError([Problem(Position(name), "", "no such file")]) from None
    except (NotRegularFile, TooLarge) as exc:
        raise RecipeError([Problem(Position(name), "", str(exc))]) from None
    except OSError as exc:
        raise RecipeError([Problem(Position(name), "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(Position(name), "", f"not UTF-8 text (byte {exc.start})")]) from None
    return load_text(text, name)


def parse_scalar(text: str, file: str) -> Any:
    """Read a command-line value the way YAML would (`4` → int, `true` → bool, `[a, b]` → list)."""
    return load_text(text, file).data if text.strip() else ""
