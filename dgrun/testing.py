"""Helpers for testing dgrun plugins: tiny pipelines, in-process plugin registration, one-call runs.

    from dgrun.testing import registered_plugin, run_recipe_data, tiny_pipeline

    def test_my_step(tmp_path):
        with registered_plugin(my_plugin_module):
            record = run_recipe_data(tmp_path, {"optimize": ["my_step"]})
        assert record["plan"][0]["status"] == "applied"

With pytest, the `dgrun_register_plugin` fixture does the same and unregisters at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgrun import plugins


@contextlib.contextmanager
def registered_plugin(
    plugin: Any, name: str = "test-plugin", distribution: str = "test-plugin"
) -> Iterator[None]:
    """Make `plugin` (a module or object with hook implementations) visible to dgrun in this process."""
    entry = (name, distribution, plugin)
    plugins._IN_PROCESS.append(entry)
    try:
        yield
    finally:
        plugins._IN_PROCESS.remove(entry)


def tiny_pipeline(kind: str = "unet", dtype: Any = None) -> Any:
    """A fresh random-weight pipeline: `unet` (Stable Diffusion) or `transformer` (FLUX), 32×32 px."""
    from dgrun.models.tiny import build_tiny_flux, build_tiny_sd

    builders = {"unet": build_tiny_sd, "transformer": build_tiny_flux}
    if kind not in builders:
        raise ValueError(f"kind must be one of {', '.join(builders)}")
    return builders[kind](dtype=dtype)


def generate_array(pipe: Any, prompt: str | list[str], steps: int, seed: int = 0) -> Any:
    """The images as one float32 array in [0, 1] from a seeded CPU generator: compare with tolerances."""
    import numpy as np
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        images = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np").images
    return np.asarray(images, dtype=np.float32)


@contextlib.contextmanager
def count_calls(*modules: Any) -> Iterator[list[int]]:
    """Count forward calls of each module inside the block (`counts[i]`): proof that a cache skipped work."""
    counts = [0] * len(modules)
    handles = []
    for index, module in enumerate(modules):

        def hook(*_: object, index: int = index) -> None:
            counts[index] += 1

        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def recipe_data(**overrides: Any) -> dict[str, Any]:
    """A small valid recipe on dgrun:tiny-sd (2 prompts, 3 steps); keyword arguments replace its top keys."""
    data: dict[str, Any] = {
        "dgrun": 1,
        "name": "test",
        "model": {"id": "dgrun:tiny-sd"},
        "generate": {"steps": 3},
        "prompts": ["a red circle on a blue background", "a green square on a white background"],
        "output": {"dir": "outputs/{name}"},
    }
    data.update(overrides)
    return data


def write_recipe(directory: Path, data: dict[str, Any], file: str = "recipe.yaml") -> Path:
    """Write recipe data as YAML (via JSON, which is valid YAML) and return the path."""
    import json

    path = Path(directory) / file
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def run_recipe_data(
    directory: Path, overrides: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    """Write a recipe into `directory`, run it there in-process and return the run record."""
    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry
    from dgrun.runner import RunOptions, run_recipe

    path = write_recipe(directory, recipe_data(**(overrides or {})))
    previous = Path.cwd()
    os.chdir(directory)
    try:
        return run_recipe(load_recipe(path), build_registry(), RunOptions(**options))
    finally:
        os.chdir(previous)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for dgrun users
    pytest = None

if pytest is not None:

    @pytest.fixture
    def dgrun_register_plugin() -> Iterator[Any]:
        """Fixture: call it with a plugin module/object; it is unregistered after the test."""
        stack = contextlib.ExitStack()

        def register(plugin: Any, name: str = "test-plugin", distribution: str = "test-plugin") -> None:
            stack.enter_context(registered_plugin(plugin, name, distribution))

        with stack:
            yield register


def plan_steps(directory: Path, steps: str, env: Any, model: str = "dgrun:tiny-flux") -> Any:
    """Plan the YAML `optimize:` list `steps` (indented entries) for `model` in `env`, loading nothing.

    Raises RecipeError as `dgrun check` would; returns the Plan (each step's `reason` says why it cannot run).
    """
    from dgrun.loading import load_recipe
    from dgrun.models import static_model_info
    from dgrun.planner import make_plan
    from dgrun.plugins import build_registry

    path = Path(directory) / "plan.yaml"
    path.write_text(f"dgrun: 1\nname: plan\nmodel: {{id: {model}}}\nprompts: [a cat]\noptimize:\n{steps}")
    loaded = load_recipe(path)
    kind, label = static_model_info(loaded.recipe.model.id)
    return make_plan(
        loaded.recipe.optimize,
        build_registry(),
        env,
        loaded.source,
        loaded.recipe.on_unavailable,
        model_kind=kind,
        model_label=label,
    )
