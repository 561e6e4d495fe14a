"""Every recipe shipped in recipes/ must validate and plan (as torchtune validates its configs in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgrun.cli import app

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_checks(recipe):
    result = CliRunner().invoke(app, ["check", "--explain", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
