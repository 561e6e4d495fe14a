"""`dgrun check` refuses what `dgrun run` would refuse, with messages a person can act on."""

from __future__ import annotations

import json

import pytest

from dgrun import Optimizer, hookimpl
from dgrun.errors import RecipeError
from dgrun.testing import recipe_data, registered_plugin, run_recipe_data, write_recipe


def test_every_problem_of_a_file_comes_in_one_pass_step_parameters_included(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "dgrun: 1\nname: x\nmodel: {id: 'dgrun:tiny-sd'}\n"
        "generate: {steps: 0, guidance_scale: .inf}\n"
        "prompts: [x]\n"
        "optimize:\n  - vae_tiling: {auto_above: 2}\n  - compile: {inductor: {cpp.cxx: cc}}\n"
    )
    code, output = invoke(["check", "r.yaml"])
    assert code == 2
    for expected in ("r.yaml:4:", "not a finite number", "r.yaml:7:", "auto_above", "r.yaml:8:", "cpp.cxx"):
        assert expected in output, output
    assert "4 problems in r.yaml" in output


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--set", "generate.²=1"], "<--set generate.²=1>"),
        (["--set", "generate.steps=.nan"], "<--set generate.steps=.nan>"),
        (["--optimize", "vae_tiling:auto_above=512,auto_above=1024"], "given twice"),
        (["--optimize", "vae_tiling:auto_above=2"], "<--optimize vae_tiling:auto_above=2>"),
    ],
)
def test_flag_mistakes_point_at_the_flag(tmp_path, monkeypatch, flags, expected, invoke):
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, recipe_data(), "r.yaml")
    code, output = invoke(["check", "r.yaml", *flags])
    assert code == 2 and expected in output and "Traceback" not in output, output
    assert "r.yaml:" not in output.replace("r.yaml;", "")


def test_a_bad_swept_value_fails_check_as_bench_would(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    data = recipe_data(
        optimize=["compile"], variants=[{"name": "modes", "sweep": {"compile.mode": ["default", "fastest"]}}]
    )
    write_recipe(tmp_path, data, "r.yaml")
    for command in ("check", "bench"):
        code, output = invoke([command, "r.yaml"])
        assert code == 2 and "fastest" in output and "r.yaml:" in output, output
    assert not (tmp_path / "outputs").exists()


class _OwnsModel:
    """A plugin that serves `test:hub-like`: its pipeline class is known only once loaded."""

    @staticmethod
    @hookimpl
    def dgrun_load_pipeline(model, device, dtype):
        if model.id != "test:hub-like":
            return None
        from dgrun.models.tiny import build_tiny_sd

        return build_tiny_sd(dtype=dtype).to(device)


def test_extra_keys_of_a_class_known_only_at_load_fail_before_the_first_image(tmp_path):
    data = {"model": {"id": "test:hub-like"}, "generate": {"steps": 1, "extra": {"bogus_kw": 1}}}
    with registered_plugin(_OwnsModel()), pytest.raises(RecipeError, match="takes no argument 'bogus_kw'"):
        run_recipe_data(tmp_path, data)
    record = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert record["status"] == "failed" and record["images"] == []


def test_extra_keys_the_pipeline_names_are_passed(tmp_path):
    record = run_recipe_data(tmp_path, {"generate": {"steps": 2, "extra": {"eta": 0.0}}})
    assert record["status"] == "complete"


class _SdOnly(Optimizer):
    name = "sd_only_test_step"

    @classmethod
    def pipeline_problem(cls, pipeline_class):
        return None if pipeline_class == "StableDiffusionPipeline" else "made for Stable Diffusion only"

    def apply(self, pipe, ctx):
        return None


@hookimpl
def _register_sd_only(register):
    register(_SdOnly)


class _SdOnlyPlugin:
    dgrun_register_optimizers = staticmethod(_register_sd_only)


def test_a_pipeline_class_rule_is_checked_statically_and_again_at_load(tmp_path):
    with registered_plugin(_SdOnlyPlugin()):
        with pytest.raises(RecipeError, match="cannot run on FluxPipeline: made for Stable Diffusion only"):
            run_recipe_data(tmp_path, {"model": {"id": "dgrun:tiny-flux"}, "optimize": ["sd_only_test_step"]})
        assert not (tmp_path / "outputs").exists()  # refused before anything was written
        record = run_recipe_data(tmp_path, {"optimize": ["sd_only_test_step"], "generate": {"steps": 1}})
        assert record["plan"][0]["status"] == "applied"
