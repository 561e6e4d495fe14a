"""Helpers for testing dgrun plugins: tiny pipelines, in-process plugin registration, one-call runs.

Installed as a pytest plugin (entry point `pytest11`), so the `dgrun_register_plugin` fixture is there in
any test session without a conftest line.

    from dgrun.testing import apply_context, registered_plugin, run_recipe_data, tiny_pipeline

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


def apply_context(
    kind: str = "unet",
    device: str = "cpu",
    dtype: Any = None,
    width: int | None = 32,
    height: int | None = 32,
    generate: Any = None,
) -> Any:
    """The `ApplyContext` a step's `apply` gets in a run: `MyStep(params).apply(pipe, apply_context())`."""
    from dgrun.optimizer import ApplyContext, Environment, ModelKind

    if dtype is None:
        import torch

        dtype = torch.float32
    env = Environment(device=device, device_kind=device.split(":")[0], probed=True)
    return ApplyContext(env, ModelKind(kind), dtype=dtype, width=width, height=height, generate=generate)


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


def plan_steps(
    directory: Path,
    steps: str,
    env: Any,
    model: str = "dgrun:tiny-flux",
    dtype: str | None = None,
    **generate: Any,
) -> Any:
    """Plan the YAML `optimize:` list `steps` (indented entries) for `model` in `env`, loading nothing.

    Keyword arguments are `generate` keys (e.g. `extra={...}`); `dtype` is `model.dtype`. Raises RecipeError
    as `dgrun check` would; returns the Plan (each step's `reason` says why it cannot run).
    """
    import json

    from dgrun.loading import load_recipe
    from dgrun.planner import plan_recipe
    from dgrun.plugins import build_registry

    path = Path(directory) / "plan.yaml"
    header = {"dgrun": 1, "name": "plan", "model": {"id": model}, "prompts": ["a cat"], "generate": generate}
    if dtype is not None:
        header["model"]["dtype"] = dtype
    text = "\n".join(f"{key}: {json.dumps(value)}" for key, value in header.items())
    path.write_text(f"{text}\noptimize:\n{steps}")
    return plan_recipe(load_recipe(path), build_registry(), env)


def plan_problems(
    directory: Path,
    steps: str,
    env: Any,
    model: str = "dgrun:tiny-flux",
    dtype: str | None = None,
    **generate: Any,
) -> list[Any]:
    """The problems `dgrun check` reports for the `optimize:` list `steps`, planned as by `plan_steps`.

    Fails the test when the steps plan without a problem.
    """
    from dgrun.errors import RecipeError

    try:
        plan_steps(directory, steps, env, model, dtype, **generate)
    except RecipeError as error:
        assert error.problems, "RecipeError without problems"
        return list(error.problems)
    raise AssertionError(f"planned without a problem:\n{steps}")


def plan_problem(
    directory: Path,
    steps: str,
    env: Any,
    model: str = "dgrun:tiny-flux",
    dtype: str | None = None,
    **generate: Any,
) -> Any:
    """The one problem of `plan_problems`; fails the test, naming them, when there are several."""
    problems = plan_problems(directory, steps, env, model, dtype, **generate)
    assert len(problems) == 1, problems
    return problems[0]


def diffusers_hooks(module: Any, by_hook: bool = False) -> dict[str, list[str]]:
    """Submodule name ("" for `module` itself) -> names of the diffusers hooks registered on it; with
    `by_hook`, hook name -> names of the submodules that carry it, in module order.

    What a cache, offloading or casting step installed, e.g. `{"": ["group_offloading"], ...}`.
    """
    found = {
        name: list(sub._diffusers_hook.hooks)
        for name, sub in module.named_modules()
        if getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook.hooks
    }
    if not by_hook:
        return found
    modules: dict[str, list[str]] = {}
    for name, hooks in found.items():
        for hook in hooks:
            modules.setdefault(hook, []).append(name)
    return modules


def last_block_mlp(pipe: Any) -> Any:
    """The MLP input projection of the last block of a tiny FLUX pipeline's transformer.

    It runs only when that block is really computed, so `count_calls` on it counts the steps a cache did
    not serve (a hook on the block itself may fire either way: caches replace the block's `forward`).
    """
    return pipe.transformer.single_transformer_blocks[-1].proj_mlp


def cached_run(
    pipe: Any, probe: Any, prompt: str | list[str], steps: int, uncached: Any
) -> tuple[int, float]:
    """Generate twice with a cache applied: how often `probe` ran in a call, and the mean absolute
    difference of the images to `uncached` (`generate_array` of the pipeline without the cache).

    Fails the test unless the second call repeats the first exactly (a run calls the pipeline several
    times: warm-up, then batches; cache state left over between calls would make images depend on call
    order) and the images differ from `uncached` (else no step was served from the cache).
    """
    import numpy as np

    with count_calls(probe) as calls:
        images = generate_array(pipe, prompt, steps)
    with count_calls(probe) as calls_again:
        again = generate_array(pipe, prompt, steps)
    assert calls_again[0] == calls[0]
    np.testing.assert_allclose(again, images, atol=1e-6, rtol=0)
    diff = np.abs(images - uncached)
    assert diff.max() > 0, "the cache changed nothing: no step was served from it"
    return calls[0], float(diff.mean())
