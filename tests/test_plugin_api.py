"""Plugin API 1.1: registration is validated through pluggy, clashes are scoped to the recipes that use
the step, `before` rules, the plugin filter, and a third-party plugin installed the way users install one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from pydantic import ConfigDict
from typer.testing import CliRunner

from dgrun import NoParams, Optimizer, StepParams, hookimpl
from dgrun.cli import main
from dgrun.errors import RecipeError
from dgrun.plugins import build_registry
from dgrun.testing import registered_plugin, run_recipe_data

APP = main.__globals__["app"]


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**hooks)


def _registering(*classes: type) -> types.SimpleNamespace:
    @hookimpl
    def dgrun_register_optimizers(register):
        for cls in classes:
            register(cls)

    return _plugin(dgrun_register_optimizers=dgrun_register_optimizers)


def _error_of(plugin, distribution: str = "dgrun-under-test") -> str | None:
    with registered_plugin(plugin, distribution=distribution):
        registry = build_registry()
    return next(p.error for p in registry.plugins if p.distribution == distribution)


# -------------------------------------------------------------------------------- registration checks
class LooseParams:  # pydantic but not StepParams
    pass


def test_registration_checks_name_params_and_markers():
    class BadName(Optimizer):
        name = "Bad Name!"

    class NotStrict(Optimizer):
        name = "not_strict"
        Params = LooseParams  # type: ignore[assignment]

    class Reopened(StepParams):
        model_config = ConfigDict(extra="allow", strict=True)

    class Opened(Optimizer):
        name = "opened"
        Params = Reopened

    assert "snake_case" in (_error_of(_registering(BadName)) or "")
    assert "must subclass dgrun.StepParams" in (_error_of(_registering(NotStrict)) or "")
    assert "closed and strict" in (_error_of(_registering(Opened)) or "")

    def dgrun_register_optimizers(register):  # no @hookimpl
        register(NotStrict)

    assert "lacks the @dgrun.hookimpl marker" in (
        _error_of(_plugin(dgrun_register_optimizers=dgrun_register_optimizers)) or ""
    )

    @hookimpl
    def dgrun_register_optimizer(register):  # misspelt
        pass

    message = _error_of(_plugin(dgrun_register_optimizer=dgrun_register_optimizer)) or ""
    assert "not a dgrun hook" in message and "dgrun_register_optimizers" in message


def test_pluggy_validates_hook_arguments():
    @hookimpl
    def dgrun_register_optimizers(register, extra_argument):
        pass

    assert "invalid hook implementation" in (
        _error_of(_plugin(dgrun_register_optimizers=dgrun_register_optimizers)) or ""
    )


def test_rules_naming_unknown_steps_or_tags_are_warnings_on_the_plugin():
    class Ruled(Optimizer):
        name = "ruled_step"
        after = frozenset({"no_such_step"})
        conflicts = frozenset({"#no_such_tag", "#cache"})

    with registered_plugin(_registering(Ruled), distribution="dgrun-ruled"):
        registry = build_registry()
    record = next(p for p in registry.plugins if p.distribution == "dgrun-ruled")
    assert record.error is None and registry.get("ruled_step") is not None
    assert any("'no_such_step'" in w for w in record.warnings)
    assert any("'#no_such_tag'" in w for w in record.warnings)
    assert not any("#cache" in w for w in record.warnings)


# ----------------------------------------------------------------------------------------- clashes
class ClashingCompile(Optimizer):
    name = "compile"
    Params = NoParams

    def apply(self, pipe, ctx):
        return None


def test_a_clash_fails_only_the_recipes_that_use_the_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with registered_plugin(_registering(ClashingCompile), distribution="dgrun-impostor"):
        record = run_recipe_data(tmp_path / "a", {"generate": {"steps": 1}, "optimize": ["vae_slicing"]})
        assert record["status"] == "complete"
        with pytest.raises(RecipeError, match=r"'compile' is provided by two plugins.*dgrun-impostor"):
            run_recipe_data(tmp_path / "b", {"optimize": ["compile"]})


def test_a_step_registered_twice_by_one_package_says_so():
    class Twin(Optimizer):
        name = "twin_step"

    class OtherTwin(Optimizer):
        name = "twin_step"

    with registered_plugin(_registering(Twin, OtherTwin), distribution="dgrun-twins"):
        registry = build_registry()
    assert "registered twice by dgrun-twins" in (registry.clash_message("twin_step") or "")


def test_dgrun_plugins_reports_clashes_and_exits_1():
    with registered_plugin(_registering(ClashingCompile), distribution="dgrun-impostor"):
        result = CliRunner().invoke(APP, ["plugins"])
    assert result.exit_code == 1
    output = result.output + (result.stderr or "")
    assert "clash: compile" in output and "dgrun-impostor" in output


# ---------------------------------------------------------------------------------------- before rule
class BeforeCompile(Optimizer):
    name = "before_compile_step"
    before = frozenset({"compile"})

    def apply(self, pipe, ctx):
        return None


def test_a_before_rule_is_enforced_with_a_valid_order(tmp_path):
    with registered_plugin(_registering(BeforeCompile)):
        with pytest.raises(
            RecipeError,
            match=r"'before_compile_step' must come before 'compile'.*valid order: "
            r"before_compile_step, compile",
        ):
            run_recipe_data(tmp_path, {"optimize": ["compile", "before_compile_step"]})
        record = run_recipe_data(tmp_path, {"generate": {"steps": 1}, "optimize": ["before_compile_step"]})
    assert record["plan"][0]["status"] == "applied"


# -------------------------------------------------------------------------------------------- filter
def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}
    )


def test_the_plugin_filter_excludes_and_names_unknown_plugins(tmp_path):
    code = (
        "from dgrun.plugins import build_registry as b; r = b(); "
        "print(sorted(p.name for p in r.plugins)); print(r.filter_note)"
    )
    excluded = _python(code, tmp_path, DGRUN_LOAD_PLUGINS="-dgrun-deepcache")
    assert "deepcache" not in excluded.stdout.splitlines()[0] and "cache_dit" in excluded.stdout
    typo = _python(code, tmp_path, DGRUN_LOAD_PLUGINS="dgrun-deepcahce")
    assert "'dgrun-deepcahce', which no installed plugin is called" in typo.stdout
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "dgrun: 1\nname: r\nmodel: {id: 'dgrun:tiny-sd'}\noptimize: [deepcache]\nprompts: [x]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dgrun", "check", "r.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DGRUN_LOAD_PLUGINS": ""},
    )
    assert result.returncode == 2 and "DGRUN_LOAD_PLUGINS" in result.stderr


# ------------------------------------------------------------------------------------- discoverability
def test_dgrun_steps_name_shows_parameters():
    result = CliRunner().invoke(APP, ["steps", "compile"])
    assert result.exit_code == 0
    for text in ("mode", "max-autotune-no-cudagraphs", "fullgraph", "inductor", "coordinate_descent_tuning"):
        assert text in result.output
    unknown = CliRunner().invoke(APP, ["steps", "compil"])
    assert unknown.exit_code == 2 and "did you mean 'compile'" in unknown.output + (unknown.stderr or "")


def test_the_schema_validates_step_parameters():
    jsonschema = pytest.importorskip("jsonschema")
    result = CliRunner().invoke(APP, ["schema"])
    schema = json.loads(result.output)
    recipe = {"dgrun": 1, "name": "x", "model": {"id": "dgrun:tiny-sd"}, "prompts": ["x"]}
    good = {**recipe, "optimize": ["tf32", {"compile": {"mode": "max-autotune", "fullgraph": True}}]}
    jsonschema.validate(good, schema)
    for bad_step in ({"compile": {"mode": 3}}, {"compile": {"nope": 1}}, "no_such_step"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**recipe, "optimize": [bad_step]}, schema)


def test_optimize_edits_append_and_remove(tmp_path):
    from dgrun.loading import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "dgrun: 1\nname: r\nmodel: {id: 'dgrun:tiny-sd'}\noptimize: [tf32, vae_slicing]\nprompts: [x]\n"
    )
    edited = load_recipe(path, optimize="+compile:mode=max-autotune,-tf32").recipe
    assert [s.name for s in edited.optimize] == ["vae_slicing", "compile"]
    assert edited.optimize[1].params == {"mode": "max-autotune"}
    assert [s.name for s in load_recipe(path, optimize="compile").recipe.optimize] == ["compile"]
    for bad, message in (
        ("-fuse_qkv", "no step 'fuse_qkv'"),
        ("+tf32", "already has step 'tf32'"),
        ("compile,-tf32", "not both"),
    ):
        with pytest.raises(RecipeError, match=message):
            load_recipe(path, optimize=bad)


# ------------------------------------------------------------------- a third-party plugin, installed
THIRD_PARTY = '''
from dgrun import NoParams, Optimizer, hookimpl


class Sharpen(Optimizer[NoParams]):
    """A stand-in third-party step: it marks the pipeline and says so."""

    name = "sharpen"
    summary = "third-party test step"
    before = frozenset({"compile"})

    def apply(self, pipe, ctx):
        pipe._sharpened = True
        return "sharpened"


@hookimpl
def dgrun_register_optimizers(register):
    register(Sharpen)
'''

THIRD_PARTY_TEST = """
import dgrun_sharpen
from dgrun.testing import run_recipe_data


def test_sharpen_runs(tmp_path, dgrun_register_plugin):
    dgrun_register_plugin(dgrun_sharpen, distribution="dgrun-sharpen-copy")
    record = run_recipe_data(tmp_path, {"generate": {"steps": 1}, "optimize": ["sharpen"]})
    assert record["plan"][0]["detail"] == "sharpened"
"""


def _install(site: Path, distribution: str, module: str, source: str) -> None:
    """Install a distribution the way pip leaves one: a dist-info with an entry point, and its module."""
    info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dgrun]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def test_a_third_party_plugin_installed_beside_dgrun(tmp_path):
    site = tmp_path / "site"
    _install(site, "dgrun-sharpen", "dgrun_sharpen", THIRD_PARTY)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    header = "dgrun: 1\nmodel: {id: 'dgrun:tiny-sd'}\ngenerate: {steps: 1}\nprompts: [x]\n"
    (tmp_path / "r.yaml").write_text(header + "name: r\noptimize: [sharpen]\n")
    (tmp_path / "plain.yaml").write_text(
        "dgrun: 1\nname: plain\nmodel: {id: 'dgrun:tiny-sd'}\ngenerate: {steps: 1}\nprompts: [x]\n"
    )

    def dgrun(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dgrun", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )

    ran = dgrun("r.yaml")
    assert ran.returncode == 0, ran.stderr
    record = json.loads((tmp_path / "outputs" / "r" / "run.json").read_text())
    assert record["plan"][0]["plugin"] == "dgrun-sharpen 1.0" and record["plan"][0]["detail"] == "sharpened"

    # A clashing copy: only the recipe that uses `sharpen` fails, naming both packages.
    _install(site, "dgrun-sharpen-fork", "dgrun_sharpen_fork", THIRD_PARTY)
    clash = dgrun("check", "r.yaml")
    assert clash.returncode == 2 and "dgrun-sharpen 1.0 and dgrun-sharpen-fork 1.0" in clash.stderr
    assert dgrun("check", "plain.yaml").returncode == 0
    assert dgrun("plugins").returncode == 1

    # A broken one is named, and the rest still works.
    _install(site, "dgrun-broken", "dgrun_broken", "raise ImportError('needs libfoo')\n")
    plugins = dgrun("plugins")
    assert "dgrun-broken" in plugins.stdout and "needs libfoo" in plugins.stdout

    # Its own tests use the fixture with no conftest line (dgrun's pytest11 entry point provides it).
    tests = tmp_path / "plugin_tests"
    tests.mkdir()
    (tests / "test_sharpen.py").write_text(THIRD_PARTY_TEST)
    pytest_run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True,
        text=True,
        cwd=tests,
        env={**env, "DGRUN_LOAD_PLUGINS": "-dgrun-sharpen-fork,-dgrun-broken"},
        timeout=300,
    )
    assert pytest_run.returncode == 0, pytest_run.stdout + pytest_run.stderr
