"""Test-wide settings and the fixtures several test modules share.

One torch thread per process: the tiny pipelines gain nothing from intra-op threads, and with several
processes on a 2-core machine (CI runs subprocess tests beside the main one) oversubscribed threads make them
10-50x slower.

Helpers a plugin author could use as well (tiny pipelines, contexts, planning, call counting) live in
`dgrun.testing`; here are only the fixtures of dgrun's own tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def baseline() -> Callable[[str, str | list[str], int], Any]:
    """`baseline(kind, prompt, steps)`: the images of an untouched tiny pipeline (`generate_array`).

    Steps change the pipeline they are given, so each test builds its own and compares with these, which
    are computed once per module for each (kind, prompt, steps).
    """
    from dgrun.testing import generate_array, tiny_pipeline

    cache: dict[tuple[str, str, int], Any] = {}

    def get(kind: str, prompt: str | list[str], steps: int) -> Any:
        key = (kind, repr(prompt), steps)
        if key not in cache:
            cache[key] = generate_array(tiny_pipeline(kind), prompt, steps)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def registry() -> Any:
    """The step registry of this installation (built-in steps and installed plugins)."""
    from dgrun.plugins import build_registry

    return build_registry()


@pytest.fixture
def invoke() -> Callable[[list[str]], tuple[int, str]]:
    """`invoke(args)`: run the `dgrun` command line in this process; (exit code, stdout + stderr)."""
    from typer.testing import CliRunner

    from dgrun.cli import app

    def run(args: list[str]) -> tuple[int, str]:
        result = CliRunner().invoke(app, args)
        return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")

    return run


@pytest.fixture
def start_dgrun() -> Callable[..., subprocess.Popen]:
    """`start_dgrun(directory, *args, **env)`: `python -m dgrun ARGS` started in `directory`.

    A `subprocess.Popen` with text stdout and stderr pipes, one torch thread (no oversubscription beside the
    test process), 120 columns, and `env` added to this process's environment.
    """

    def start(directory: Path, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "dgrun", *args],
            cwd=directory,
            env={**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start
