"""Tests of the `freeu` step, written the way a plugin's own tests are.

No conftest.py and no `pytest_plugins` line: the `dgrun_register_plugin` fixture comes with dgrun (its
pytest11 entry point), and it registers the plugin in this process for one test, so these tests pass
whether or not the package is installed. The plugin folder goes on sys.path for the uninstalled case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dgrun_example
from dgrun_example import FreeU, FreeUParams

from dgrun import Environment, RecipeError
from dgrun.testing import (
    apply_context,
    generate_array,
    plan_steps,
    run_recipe_data,
    tiny_pipeline,
)

PROMPT = "a red circle on a blue background"
STEPS = 4
CPU = Environment(device="cpu", device_kind="cpu")


@pytest.fixture
def freeu_plugin(dgrun_register_plugin) -> None:
    """The plugin, registered for this test under its distribution name (as installed, it is the same)."""
    dgrun_register_plugin(dgrun_example, name="example", distribution="dgrun-example")


def test_freeu_is_recorded_as_applied_on_tiny_sd(tmp_path: Path, freeu_plugin: None) -> None:
    record = run_recipe_data(tmp_path, {"optimize": ["freeu"]})

    assert record["status"] == "complete"
    [entry] = record["plan"]
    assert entry["step"] == "freeu"
    assert entry["status"] == "applied"
    assert entry["detail"] == "s1 0.9, s2 0.2, b1 1.5, b2 1.6"
    assert entry["plugin"].startswith("dgrun-example")
    assert entry["effect"]["up_blocks_with_freeu"] == entry["effect"]["up_blocks"] > 0


def test_freeu_changes_the_images_but_keeps_them_finite() -> None:
    baseline = generate_array(tiny_pipeline("unet"), PROMPT, STEPS)
    pipe = tiny_pipeline("unet")

    detail = FreeU(FreeUParams()).apply(pipe, apply_context("unet"))
    image = generate_array(pipe, PROMPT, STEPS)

    assert "b1 1.5" in detail
    assert np.isfinite(image).all()
    assert np.abs(image - baseline).max() > 1e-3, "FreeU did not change the image"


def test_freeu_is_refused_on_a_transformer_model(tmp_path: Path, freeu_plugin: None) -> None:
    with pytest.raises(RecipeError, match=r"'freeu' works on UNet pipelines only.*FluxPipeline"):
        run_recipe_data(tmp_path, {"model": {"id": "dgrun:tiny-flux"}, "optimize": ["freeu"]})


def test_freeu_must_come_before_compile(tmp_path: Path, freeu_plugin: None) -> None:
    with pytest.raises(RecipeError, match=r"'freeu' must come before 'compile'.*valid order: freeu, compile"):
        plan_steps(tmp_path, "  - compile\n  - freeu\n", CPU, model="dgrun:tiny-sd")

    plan = plan_steps(tmp_path, "  - freeu\n  - compile\n", CPU, model="dgrun:tiny-sd")
    assert [step.name for step in plan.steps] == ["freeu", "compile"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{b1: 0}", "greater than 0"),  # diffusers would switch FreeU off silently
        ("{s1: '0.9'}", "valid number"),  # strict: a string is not a number
        ("{s3: 1.0}", "unknown parameter 's3'"),  # closed: no unknown keys
    ],
)
def test_parameters_are_checked_before_loading(
    tmp_path: Path, freeu_plugin: None, params: str, message: str
) -> None:
    with pytest.raises(RecipeError, match=message):
        plan_steps(tmp_path, f"  - freeu: {params}\n", CPU, model="dgrun:tiny-sd")
