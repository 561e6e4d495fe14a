"""The plugin path: entry points, in-process plugins, failures that stay contained, name clashes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import types

import pytest

from dgrun import ApplyContext, ModelKind, Optimizer, StepParams, hookimpl
from dgrun.plugins import build_registry
from dgrun.testing import registered_plugin, run_recipe_data, tiny_pipeline


class CountCallsParams(StepParams):
    label: str = "counted"


class CountCalls(Optimizer):
    """Test optimizer: wraps the denoiser's forward to count calls (a real change to the pipeline)."""

    name = "count_calls"
    Params = CountCallsParams
    calls = 0

    def apply(self, pipe, ctx: ApplyContext):
        original = pipe.unet.forward

        def counting(*args, **kwargs):
            CountCalls.calls += 1
            return original(*args, **kwargs)

        pipe.unet.forward = counting
        return self.params.label


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**hooks)


@hookimpl
def _register_count_calls(register):
    register(CountCalls)


def test_in_process_plugin_step_runs_through_the_hook(tmp_path):
    plugin = _plugin(dgrun_register_optimizers=_register_count_calls)
    CountCalls.calls = 0
    with registered_plugin(plugin, distribution="dgrun-test-plugin"):
        record = run_recipe_data(tmp_path, {"optimize": [{"count_calls": {"label": "hello"}}]})
    step = record["plan"][0]
    assert step["plugin"] == "dgrun-test-plugin" and step["status"] == "applied" and step["detail"] == "hello"
    assert CountCalls.calls == 2 * 3, "one UNet call per step per prompt (CFG is batched)"


def test_plugin_can_own_a_model_id(tmp_path):
    loaded = []

    @hookimpl
    def dgrun_load_pipeline(model, device, dtype):
        if model.id != "acme:flux":
            return None
        loaded.append((device, dtype))
        return tiny_pipeline("transformer").to(device)

    with registered_plugin(_plugin(dgrun_load_pipeline=dgrun_load_pipeline)):
        record = run_recipe_data(tmp_path, {"model": {"id": "acme:flux"}, "optimize": ["first_block_cache"]})
    assert loaded and loaded[0][0] == "cpu"
    assert record["model"]["kind"] == "transformer" and record["model"]["pipeline_class"] == "FluxPipeline"
    # The step ran on the plugin's pipeline (3 steps are too few for its threshold to cache anything).
    assert record["plan"][0]["status"] in ("applied", "no effect")
    assert record["plan"][0]["effect"]["denoiser_calls"] == 6


def test_plugin_owned_model_of_the_wrong_kind_is_caught_at_load(tmp_path):
    from dgrun.errors import RecipeError

    @hookimpl
    def dgrun_load_pipeline(model, device, dtype):
        return tiny_pipeline("transformer") if model.id == "acme:flux" else None

    with (
        registered_plugin(_plugin(dgrun_load_pipeline=dgrun_load_pipeline)),
        pytest.raises(RecipeError, match=r"works on UNet pipelines only.*FluxPipeline"),
    ):
        run_recipe_data(tmp_path, {"model": {"id": "acme:flux"}, "optimize": ["deepcache"]})


def test_plugin_that_raises_while_registering_does_not_break_others():
    @hookimpl
    def broken(register):
        raise RuntimeError("boom")

    with registered_plugin(
        _plugin(dgrun_register_optimizers=broken), name="broken", distribution="dgrun-broken"
    ):
        registry = build_registry()
    failed = {p.distribution: p.error for p in registry.failed()}
    assert "boom" in failed["dgrun-broken"]
    assert registry.get("compile") is not None and registry.get("deepcache") is not None


def test_two_plugins_with_one_step_name_is_an_error_naming_both():
    class Impostor(Optimizer):
        name = "compile"

    @hookimpl
    def register_impostor(register):
        register(Impostor)

    with registered_plugin(
        _plugin(dgrun_register_optimizers=register_impostor), distribution="dgrun-impostor"
    ):
        registry = build_registry()
    message = registry.clash_message("compile") or ""
    assert re.search(r"'compile'.*dgrun 0\.1\.0.*dgrun-impostor", message), message
    assert "DGRUN_LOAD_PLUGINS=-dgrun-impostor" in message
    assert registry.get("compile") is None and registry.get("vae_slicing") is not None


def test_register_rejects_things_that_are_not_optimizers():
    @hookimpl
    def register_junk(register):
        register(object)

    with registered_plugin(_plugin(dgrun_register_optimizers=register_junk), distribution="dgrun-junk"):
        registry = build_registry()
    assert "Optimizer subclass" in {p.distribution: p.error for p in registry.failed()}["dgrun-junk"]


def test_kind_rule_of_a_plugin_step_is_checked_before_loading():
    from dgrun.optimizer import Environment
    from dgrun.planner import make_plan
    from dgrun.recipe import StepSpec
    from dgrun.yamlio import SourceMap

    class UnetOnly(Optimizer):
        name = "unet_only"
        applies_to = frozenset({ModelKind.UNET})

    @hookimpl
    def register(register):
        register(UnetOnly)

    from dgrun.errors import RecipeError

    with registered_plugin(_plugin(dgrun_register_optimizers=register)):
        registry = build_registry()
    env = Environment(device="cpu", device_kind="cpu")
    with pytest.raises(RecipeError, match="works on UNet pipelines only"):
        make_plan([StepSpec(name="unet_only")], registry, env, SourceMap(), model_kind=ModelKind.TRANSFORMER)


def _run_python(code: str, env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_entry_point_plugins_are_filtered_by_DGRUN_LOAD_PLUGINS(tmp_path):
    code = "from dgrun.plugins import build_registry as b; r = b(); print(sorted(p.name for p in r.plugins))"
    everything = _run_python(code, {}, tmp_path)
    assert "deepcache" in everything.stdout and "builtin" in everything.stdout
    none = _run_python(code, {"DGRUN_LOAD_PLUGINS": ""}, tmp_path)
    assert none.stdout.strip() == "['builtin']", none.stderr
    only = _run_python(code, {"DGRUN_LOAD_PLUGINS": "dgrun-deepcache"}, tmp_path)
    assert only.stdout.strip() == "['builtin', 'deepcache']", only.stderr


def test_plugin_that_fails_to_import_is_named_and_other_steps_still_run(tmp_path):
    """A fake installed distribution whose entry point module raises on import."""
    site = tmp_path / "site"
    dist_info = site / "dgrun_broken_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dgrun-broken-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[dgrun]\nbroken = dgrun_broken_plugin_mod\n")
    (site / "dgrun_broken_plugin_mod.py").write_text("raise ImportError('missing dependency xyz')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(
            """
            dgrun: 1
            name: r
            model: {id: "dgrun:tiny-sd"}
            optimize: [vae_slicing]
            prompts: [hello]
            """
        )
    )
    code = "import sys; from dgrun.cli import main; main(['check', 'r.yaml'])"
    result = _run_python(code, {"PYTHONPATH": str(site)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dgrun-broken-plugin" in result.stderr and "missing dependency xyz" in result.stderr
    assert "Traceback" not in result.stderr
