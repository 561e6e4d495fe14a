"""The corpus of realistic mistakes in tests/bad_recipes/: every one is bad input, reported well.

Each file's first line says where the error must point: `# expect: FILE:LINE: text`. Both `dgrun check`
and `dgrun run` must exit 2, name that file and line with the text, show no traceback and write nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "bad_recipes"
CASES = sorted(p.name for p in CORPUS.glob("*.yaml"))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("bad") / "bad_recipes"
    shutil.copytree(CORPUS, target)
    return target


def _expectation(path: Path) -> tuple[str, str]:
    match = re.match(r"# expect: (\S+:\d+): (.*)", path.read_text().splitlines()[0])
    assert match, f"{path.name} lacks an `# expect: FILE:LINE: text` first line"
    return match.group(1), match.group(2)


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("name", CASES)
def test_bad_recipe_is_reported_at_its_line(name, command, corpus_copy, monkeypatch, invoke):
    monkeypatch.chdir(corpus_copy)
    location, text = _expectation(corpus_copy / name)
    before = _files(corpus_copy)
    code, output = invoke([command, name])
    assert code == 2, output
    assert f"{location}:" in output, output
    assert text in output, output
    assert "Traceback" not in output
    assert _files(corpus_copy) == before, "a bad recipe must not write anything"
    assert os.getcwd() == str(corpus_copy)
