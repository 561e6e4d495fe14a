"""Recipes come from other people's repositories: they cannot write outside the working directory, run
code, or turn on remote code by themselves."""

from __future__ import annotations

import json

import pytest

from dgrun.errors import RecipeError, UsageError
from dgrun.loading import load_recipe
from dgrun.outputs import resolve_output_dir
from dgrun.testing import recipe_data


def _load(tmp_path, **changes):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe_data(**changes)))
    return load_recipe(path).recipe


@pytest.mark.parametrize("directory", ["../out", "outputs/../../x", "/etc/dgrun", "C:/x", "out/{user}"])
def test_output_dir_cannot_leave_the_working_directory(tmp_path, directory):
    with pytest.raises(RecipeError):
        _load(tmp_path, output={"dir": directory})


def test_relative_out_flag_cannot_escape_but_an_absolute_one_may(tmp_path):
    recipe = _load(tmp_path)
    with pytest.raises(UsageError, match="leaves the working directory"):
        resolve_output_dir(recipe, "../elsewhere", cwd=tmp_path)
    assert resolve_output_dir(recipe, str(tmp_path.parent / "abs"), cwd=tmp_path) == tmp_path.parent / "abs"
    assert resolve_output_dir(recipe, None, cwd=tmp_path) == tmp_path / "outputs" / "test"


@pytest.mark.parametrize("prompt_id", ["../evil", "a/b", "/abs", ".hidden", "nul\0byte"])
def test_prompt_ids_cannot_name_paths(tmp_path, prompt_id):
    with pytest.raises(RecipeError):
        _load(tmp_path, prompts=[{"text": "x", "id": prompt_id}])


def test_recipe_name_cannot_name_paths(tmp_path):
    with pytest.raises(RecipeError):
        _load(tmp_path, name="../x")


@pytest.mark.parametrize("pipeline", ["os.system", "subprocess:Popen", "diffusers.pipelines.x"])
def test_pipeline_cannot_be_an_import_path(tmp_path, pipeline):
    with pytest.raises(RecipeError, match=r"model\.pipeline"):
        _load(tmp_path, model={"id": "dgrun:tiny-sd", "pipeline": pipeline})


def test_unknown_steps_are_never_imported(tmp_path):
    from dgrun.optimizer import Environment
    from dgrun.planner import plan_recipe
    from dgrun.plugins import build_registry

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe_data(optimize=["os_system"])))
    with pytest.raises(RecipeError, match="unknown step 'os_system'"):
        plan_recipe(load_recipe(path), build_registry(), Environment(device="cpu", device_kind="cpu"))
