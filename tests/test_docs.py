"""The documentation keeps up with the code: every hook, step, public name and recipe key is documented,
and every hook and step is exercised by some test.

docs/plugins.md has a `## \\`hook\\`` heading per hook in dgrun/hookspecs.py, docs/steps.md one per step
(built in, or provided by a plugin package in plugins/); the names are also looked up in the test sources
(tests/ and plugins/*/tests/), so a new hook or step without a test fails here.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import dgrun
from dgrun import hookspecs, testing
from dgrun.optimizer import BUILTIN_TAGS, Optimizer
from dgrun.plugins import build_registry
from dgrun.recipe import GenerateSpec, ModelSpec, OutputSpec, PromptSpec, Recipe, VariantSpec
from dgrun.tune.spec import TuneConstraints, TuneSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _headings(path: Path) -> set[str]:
    """Names in `## \\`name\\`` headings."""
    return set(re.findall(r"^## `([^`]+)`[ \t]*$", _text(path), flags=re.MULTILINE))


def _test_sources() -> dict[Path, str]:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]
    return {f: _text(f) for f in files if f.resolve() != Path(__file__).resolve()}


def _untested(names: set[str]) -> list[str]:
    sources = "\n".join(_test_sources().values())
    return sorted(
        n for n in names if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", sources)
    )


def _hook_names() -> set[str]:
    return {name for name, value in vars(hookspecs).items() if hasattr(value, "dgrun_spec")}


def _builtin_steps(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    monkeypatch.setenv("DGRUN_LOAD_PLUGINS", "")  # dgrun's own steps only
    registry = build_registry()
    return {name for name, info in registry.optimizers.items() if info.distribution == "dgrun"}


def _plugin_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Step name -> plugin folder, for every plugin package in plugins/, installed or not.

    Each package's `dgrun` entry points are imported from its folder and their registration hook called.
    """
    steps: dict[str, str] = {}
    for project in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        config = tomllib.loads(_text(project))
        entry_points = config.get("project", {}).get("entry-points", {}).get("dgrun", {})
        assert entry_points, f"{project.parent.name} declares no [project.entry-points.dgrun]"
        monkeypatch.syspath_prepend(str(project.parent))
        for target in entry_points.values():
            module_name, _, attribute = target.partition(":")
            plugin = importlib.import_module(module_name)
            if attribute:
                plugin = getattr(plugin, attribute)
            found: list[type] = []
            register: Callable[[type], None] = found.append
            plugin.dgrun_register_optimizers(register)
            steps.update({cls.name: project.parent.name for cls in found})
    return steps


# ----------------------------------------------------------------------------------------------- hooks
def test_every_hook_has_a_heading_in_the_plugin_guide() -> None:
    hooks = _hook_names()
    assert hooks >= {"dgrun_register_optimizers", "dgrun_load_pipeline"}
    missing = sorted(hooks - _headings(DOCS / "plugins.md"))
    assert not missing, f"docs/plugins.md has no `## \\`name\\`` heading for the hooks {missing}"


def test_every_hook_is_exercised_by_a_test() -> None:
    missing = _untested(_hook_names())
    assert not missing, f"no test under tests/ or plugins/*/tests/ mentions the hooks {missing}"


# ----------------------------------------------------------------------------------------------- steps
def test_every_builtin_step_has_a_heading_and_a_test(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _builtin_steps(monkeypatch)
    assert {"tf32", "compile", "quantize", "mag_cache"} <= steps
    undocumented = sorted(steps - _headings(DOCS / "steps.md"))
    assert not undocumented, (
        f"docs/steps.md has no `## \\`name\\`` heading for the built-in steps {undocumented}"
    )
    untested = _untested(steps)
    assert not untested, f"no test mentions the built-in steps {untested}"


def test_every_plugin_step_in_plugins_has_a_heading_and_a_test(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _plugin_steps(monkeypatch)
    assert {"deepcache", "cache_dit", "xdit", "freeu"} <= set(steps)
    undocumented = sorted(steps.keys() - _headings(DOCS / "steps.md"))
    assert not undocumented, (
        f"docs/steps.md has no `## \\`name\\`` heading for the plugin steps {undocumented}"
    )
    untested = _untested(set(steps))
    assert not untested, f"no test mentions the plugin steps {untested}"


def test_the_step_reference_names_no_step_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    known = _builtin_steps(monkeypatch) | set(_plugin_steps(monkeypatch))
    stale = sorted(_headings(DOCS / "steps.md") - known)
    assert not stale, f"docs/steps.md documents steps nothing provides: {stale}"


# ------------------------------------------------------------------------------------------ plugin API
def test_every_public_name_is_in_the_plugin_guide() -> None:
    guide = _text(DOCS / "plugins.md")
    missing = [name for name in dgrun.__all__ if name not in guide]
    assert not missing, f"docs/plugins.md never mentions dgrun.{missing}"


def test_the_plugin_guide_covers_the_optimizer_api_tags_and_test_helpers() -> None:
    guide = _text(DOCS / "plugins.md")
    members = {n for n in vars(Optimizer) if not n.startswith("_")} | set(Optimizer.__annotations__)
    helpers = {
        name
        for name, value in vars(testing).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == testing.__name__
        and name != "dgrun_register_plugin"
    }
    for kind, names in (("Optimizer members", members), ("tags", set(BUILTIN_TAGS)), ("helpers", helpers)):
        missing = sorted(n for n in names if f"`{n}" not in guide)
        assert not missing, f"docs/plugins.md does not document the {kind} {missing}"
    assert "dgrun_register_plugin" in guide and "pytest11" in guide


# --------------------------------------------------------------------------------------------- recipes
def test_the_recipe_reference_names_every_key() -> None:
    reference = _text(DOCS / "recipes.md")
    models = (Recipe, ModelSpec, GenerateSpec, PromptSpec, OutputSpec, VariantSpec, TuneSpec, TuneConstraints)
    missing = sorted(
        f"{model.__name__}.{key}"
        for model in models
        for key in model.model_fields
        if f"`{key}`" not in reference
    )
    assert not missing, f"docs/recipes.md does not document {missing}"


# ---------------------------------------------------------------------------------------------- README
def test_the_readme_stands_alone() -> None:
    readme = _text(ROOT / "README.md")
    for outside in ("../shared", "DESIGN.md"):
        assert outside not in readme, f"README.md points outside the repository ({outside})"
    for doc in ("docs/recipes.md", "docs/steps.md", "docs/plugins.md"):
        assert doc in readme, f"README.md does not point to {doc}"
    for target in re.findall(r"\]\(([^)#\s]+)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_the_plugin_template_is_found_by_the_meta_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugin's module is importable from its folder without installing it."""
    steps = _plugin_steps(monkeypatch)
    assert steps["freeu"] == "dgrun-example"
    assert "dgrun_example" in sys.modules
