"""Which keyword arguments a diffusers pipeline's `__call__` takes, so `generate.extra` is checked early.

A key the pipeline does not name would be swallowed by its `**kwargs` (or fail only at the first image),
so `generate.extra` keys must be named parameters of the pipeline's `__call__`. `dgrun check` imports no
torch, hence no diffusers: when the pipeline class is known before loading (a built-in model, a local
directory's model_index.json) its source file is found in the installed diffusers and read with `ast`.
For a hub id the class is known only once loaded; the runner then asks `inspect`, before the first image.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

from dgrun.recipe import extra_key_problem

MAX_SOURCE_BYTES = 4 * 1024 * 1024


@functools.lru_cache(maxsize=64)
def static_call_parameters(pipeline_class: str) -> frozenset[str] | None:
    """Named `__call__` parameters of diffusers' `pipeline_class`, read from its source; None if unknown."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pipeline_class):
        return None
    try:
        spec = importlib.util.find_spec("diffusers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pipelines = Path(next(iter(spec.submodule_search_locations))) / "pipelines"
    pattern = re.compile(rb"^class " + pipeline_class.encode() + rb"\(", re.MULTILINE)
    for path in sorted(pipelines.rglob("pipeline_*.py")):
        try:
            source = path.read_bytes()[:MAX_SOURCE_BYTES]
        except OSError:
            continue
        if pattern.search(source):
            return _call_parameters_in(source, pipeline_class)
    return None


def _call_parameters_in(source: bytes, class_name: str) -> frozenset[str] | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "__call__":
                    arguments = item.args
                    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
                    return frozenset(n for n in names if n != "self")
    return None


def runtime_call_parameters(pipe: Any) -> frozenset[str] | None:
    """The named `__call__` parameters of a loaded pipeline (its `**kwargs` excluded)."""
    try:
        signature = inspect.signature(type(pipe).__call__)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in signature.parameters.items() if p.kind in kinds and n != "self")


def extra_problems(
    extra: dict[str, Any], accepted: frozenset[str] | None, pipeline_class: str
) -> dict[str, str]:
    """Problems of `generate.extra` keys by key: refused outright, or not an argument of the pipeline."""
    problems = {}
    for key in extra:
        problem = extra_key_problem(key)
        if problem is None and accepted is not None and key not in accepted:
            problem = f"{pipeline_class} takes no argument {key!r}{_suggestion(key, accepted)}"
        if problem:
            problems[key] = problem
    return problems


def _suggestion(key: str, accepted: frozenset[str]) -> str:
    import difflib

    usable = sorted(a for a in accepted if extra_key_problem(a) is None)
    close = difflib.get_close_matches(key, usable, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; it takes: {', '.join(usable)}" if usable else ""
