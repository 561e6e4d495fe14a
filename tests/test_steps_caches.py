"""The transformer caches (pab, faster_cache, taylor_seer, mag_cache), xformers and compile's inductor flags.

Each cache test shows the diffusers hook on the modules it should wrap, counts how often a module deep
inside the last transformer block really runs (a hook on the wrapped module itself would fire even when its
output comes from the cache), and compares the image with the uncached one. Images are float arrays on a
0-1 scale from a fixed seed; "close" means mean absolute difference below 0.01 (≈ 2.5 of 255 levels).
Rules (model kind, conflicts, order) are checked through the planner, without loading a model.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.errors import Problem, RecipeError  # noqa: E402
from dgrun.loading import load_recipe  # noqa: E402
from dgrun.models import static_model_info  # noqa: E402
from dgrun.optimizer import ApplyContext, Environment, ModelKind  # noqa: E402
from dgrun.planner import make_plan  # noqa: E402
from dgrun.plugins import Registry, build_registry  # noqa: E402
from dgrun.steps.attention import Xformers  # noqa: E402
from dgrun.steps.cache import FasterCache, PyramidAttentionBroadcast, TaylorSeer  # noqa: E402
from dgrun.steps.compile import Compile, CompileParams  # noqa: E402
from dgrun.steps.mag_cache import MagCache  # noqa: E402
from dgrun.testing import count_calls, generate_array, run_recipe_data, tiny_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS = 8
CPU = Environment(device="cpu", device_kind="cpu")
CLOSE = 0.01  # mean absolute difference on the 0-1 scale
CACHES = ("pab", "faster_cache", "taylor_seer", "mag_cache")
# Params that make each cache valid in a recipe (mag_cache has no usable default ratios).
RECIPE_PARAMS = {"mag_cache": " {mag_ratios: flux}"}


# ---------------------------------------------------------------------------------------------- helpers
def _ctx() -> ApplyContext:
    return ApplyContext(env=CPU, model_kind=ModelKind.TRANSFORMER, dtype=torch.float32, width=32, height=32)


def _generate(pipe: Any, steps: int = STEPS) -> np.ndarray:
    return generate_array(pipe, PROMPT, steps)


def _counting(module: torch.nn.Module) -> Iterator[list[int]]:
    return count_calls(module)


def _hooks(module: torch.nn.Module) -> dict[str, list[str]]:
    """diffusers hook name -> names of the submodules that carry it (from each `_diffusers_hook` registry)."""
    found: dict[str, list[str]] = {}
    for name, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook_name in getattr(registry, "hooks", {}) if registry is not None else {}:
            found.setdefault(hook_name, []).append(name)
    return found


def _last_attention_q(pipe: Any) -> torch.nn.Module:
    """A projection inside the last block's attention: it runs only when attention is really computed."""
    return pipe.transformer.single_transformer_blocks[-1].attn.to_q


def _last_mlp(pipe: Any) -> torch.nn.Module:
    """The last block's MLP input projection: it runs only when the whole block is computed."""
    return pipe.transformer.single_transformer_blocks[-1].proj_mlp


ATTENTIONS = [
    "transformer_blocks.0.attn",
    "transformer_blocks.1.attn",
    "single_transformer_blocks.0.attn",
    "single_transformer_blocks.1.attn",
]


@pytest.fixture(scope="module")
def baseline() -> Callable[[int], np.ndarray]:
    """Uncached images, one per step count, computed once for the module."""
    cache: dict[int, np.ndarray] = {}

    def get(steps: int = STEPS) -> np.ndarray:
        if steps not in cache:
            cache[steps] = _generate(tiny_pipeline("transformer"), steps)
        return cache[steps]

    return get


def _cached_run(
    pipe: Any, probe: torch.nn.Module, baseline: Callable[[int], np.ndarray]
) -> tuple[int, float]:
    """Generate twice; return how often `probe` ran and the mean difference to the uncached image.

    The second call must repeat the first exactly: the runner calls the pipeline several times (warm-up,
    then batches), and a cache whose state leaked across calls would make images depend on call order.
    """
    with _counting(probe) as calls:
        image = _generate(pipe)
    with _counting(probe) as calls_again:
        again = _generate(pipe)
    assert calls_again[0] == calls[0]
    np.testing.assert_allclose(again, image, atol=1e-6, rtol=0)
    diff = np.abs(image - baseline(STEPS))
    assert diff.max() > 0, "the cache changed nothing: no step was served from it"
    return calls[0], float(diff.mean())


# ------------------------------------------------------------------------------------------------- pab
def test_pab_reuses_attention_between_steps(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    detail = PyramidAttentionBroadcast(PyramidAttentionBroadcast.Params()).apply(pipe, _ctx())

    assert detail == "spatial attention every 2 steps for timesteps in (100, 800)"
    assert _hooks(pipe.transformer) == {"pyramid_attention_broadcast": ATTENTIONS}
    calls, diff = _cached_run(pipe, _last_attention_q(pipe), baseline)
    # Every other step inside the timestep window (100, 800) reuses the attention output.
    assert calls < STEPS, f"attention ran on all {STEPS} steps"
    assert diff < CLOSE


# ---------------------------------------------------------------------------------------------- faster
def test_faster_cache_reuses_attention_on_a_guidance_distilled_pipeline(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    detail = FasterCache(FasterCache.Params()).apply(pipe, _ctx())

    assert "guidance-distilled" in detail  # FLUX batches no unconditional branch: found automatically
    hooks = _hooks(pipe.transformer)
    assert hooks["faster_cache_denoiser"] == [""]  # the transformer itself
    assert hooks["faster_cache_block"] == ATTENTIONS
    calls, diff = _cached_run(pipe, _last_attention_q(pipe), baseline)
    assert calls < STEPS
    assert diff < CLOSE


def test_a_cache_that_fails_on_the_first_call_is_disabled_by_recover(baseline) -> None:
    # Declaring FLUX not guidance-distilled makes diffusers split a batch of one into [uncond, cond].
    pipe = tiny_pipeline("transformer")
    step = FasterCache(FasterCache.Params(is_guidance_distilled=False))
    step.apply(pipe, _ctx())
    with pytest.raises((IndexError, ValueError)) as info:
        _generate(pipe)

    assert step.recover(pipe, RuntimeError("unrelated failure")) is None  # not raised inside the cache
    message = step.recover(pipe, info.value)

    assert message is not None and message.startswith("disabled: the cache failed on the first call")
    assert _hooks(pipe.transformer) == {}
    np.testing.assert_allclose(_generate(pipe), baseline(STEPS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ taylor_seer
def test_taylor_seer_predicts_attention_outputs(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = TaylorSeer.Params(cache_interval=3, disable_cache_before_step=2, taylor_factors_dtype="float32")
    TaylorSeer(params).apply(pipe, _ctx())

    assert _hooks(pipe.transformer) == {"taylorseer_cache": ATTENTIONS}
    calls, diff = _cached_run(pipe, _last_attention_q(pipe), baseline)
    # steps 0, 1 (warm-up), then one full step in three: 0, 1, 3, 6
    assert calls == 4
    assert diff < CLOSE


def test_taylor_seer_lite_mode_skips_whole_blocks(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = TaylorSeer.Params(cache_interval=3, disable_cache_before_step=2, use_lite_mode=True)
    TaylorSeer(params).apply(pipe, _ctx())

    hooked = _hooks(pipe.transformer)["taylorseer_cache"]
    assert "proj_out" in hooked and "single_transformer_blocks.1" in hooked
    calls, diff = _cached_run(pipe, _last_mlp(pipe), baseline)
    assert calls == 4
    assert diff < 2 * CLOSE  # extrapolating the final projection is coarser than extrapolating attention


# -------------------------------------------------------------------------------------------- mag_cache
def test_mag_cache_skips_blocks_and_follows_each_calls_step_count(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    step = MagCache(MagCache.Params(mag_ratios="flux", threshold=0.3))
    detail = step.apply(pipe, _ctx())

    assert detail == "threshold 0.3, mag_ratios flux (28 values), resampled to each call's steps"
    hooks = _hooks(pipe.transformer)
    assert hooks["mag_cache_leader_block_hook"] == ["transformer_blocks.0"]
    assert hooks["mag_cache_block_hook"] == [
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    calls, diff = _cached_run(pipe, _last_mlp(pipe), baseline)
    assert calls < STEPS
    assert diff < CLOSE
    # The 28 FLUX ratios were resampled to this call's 8 steps, and follow a call with 12.
    assert step.config.num_inference_steps == STEPS and len(step.config.mag_ratios) == STEPS
    _generate(pipe, steps=12)
    assert step.config.num_inference_steps == 12 and len(step.config.mag_ratios) == 12


def test_mag_cache_calibrates_its_ratios_with_one_uncached_call() -> None:
    pipe = tiny_pipeline("transformer")
    step = MagCache(MagCache.Params(calibrate=True, num_inference_steps=STEPS, threshold=0.5))
    with _counting(_last_mlp(pipe)) as calls:
        detail = step.apply(pipe, _ctx())

    assert calls[0] == STEPS  # the calibration call computed every block of every step
    assert detail.startswith(f"threshold 0.5, calibrated on {STEPS} steps: mag_ratios [1.0, ")
    assert len(step.ratios) == STEPS and all(r > 0 for r in step.ratios)
    assert "mag_cache_leader_block_hook" in _hooks(pipe.transformer)
    with _counting(_last_mlp(pipe)) as calls:
        _generate(pipe)
    assert calls[0] < STEPS


def test_mag_cache_without_ratios_or_calibration_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"give mag_ratios .* or calibrate: true"):
        MagCache.Params()
    with pytest.raises(ValidationError, match="not both"):
        MagCache.Params(mag_ratios=[1.0, 0.9], calibrate=True)


@pytest.mark.parametrize(
    "cls, params",
    [
        (PyramidAttentionBroadcast, {"spatial_attention_block_skip_range": None}),
        (PyramidAttentionBroadcast, {"spatial_attention_timestep_skip_range": [800, 100]}),
        (PyramidAttentionBroadcast, {"spatial_attention_timestep_skip_range": [100.0, 800.0]}),
        (FasterCache, {"tensor_format": "BHWC"}),
        (FasterCache, {"spatial_attention_block_identifiers": ["transformer_blocks.*attn("]}),
        (TaylorSeer, {"taylor_factors_dtype": "float64"}),
        (TaylorSeer, {"disable_cache_before_step": 5, "disable_cache_after_step": 4}),
        (MagCache, {"mag_ratios": [1.0, -0.5]}),
    ],
)
def test_cache_params_are_checked(cls: Any, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        cls.Params(**params)


# ---------------------------------------------------------------------------------------------- xformers
def test_xformers_says_everything_it_misses() -> None:
    on_cpu = Xformers.unavailable_reason(CPU)
    on_cuda = Xformers.unavailable_reason(Environment("cuda", "cuda", (9, 0)))
    package = "the package xformers (not installed)"
    if Environment.has_package("xformers"):
        assert on_cpu == "needs a CUDA device; this run uses cpu"
        assert on_cuda is None
    else:
        assert on_cpu == f"needs {package} and a CUDA device; this run uses cpu"
        assert on_cuda == f"needs {package}"


def test_xformers_with_skip_is_skipped_and_recorded(tmp_path: Path) -> None:
    record = run_recipe_data(
        tmp_path,
        {
            "optimize": [{"xformers": {"on_unavailable": "skip"}}],
            "prompts": [PROMPT],
            "generate": {"steps": 2},
        },
    )

    assert record["status"] == "complete"
    [entry] = record["plan"]
    assert entry["step"] == "xformers" and entry["status"] == "skipped"
    assert entry["detail"] == Xformers.unavailable_reason(CPU)
    assert len(record["images"]) == 1


# ------------------------------------------------------------------------------------- planner rules
@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry()


def _problems(
    registry: Registry, tmp_path: Path, steps: str, model: str = "dgrun:tiny-flux"
) -> list[Problem]:
    """Plan a recipe the way `dgrun check` does (model kind known) and return its problems."""
    optimize = textwrap.indent(textwrap.dedent(steps), "  ")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"dgrun: 1\nname: rules\nmodel:\n  id: {model}\nprompts: [a cat]\noptimize:\n{optimize}")
    loaded = load_recipe(path)
    kind, label = static_model_info(loaded.recipe.model.id)
    with pytest.raises(RecipeError) as info:
        make_plan(loaded.recipe.optimize, registry, CPU, loaded.source, model_kind=kind, model_label=label)
    return info.value.problems


def _order(problem: Problem) -> list[str]:
    match = re.search(r"a valid order: ([a-z0-9_, ]+)", problem.message)
    assert match, problem.message
    return [name.strip() for name in match.group(1).split(",")]


@pytest.mark.parametrize("step", CACHES)
def test_transformer_caches_refuse_a_unet_pipeline(registry: Registry, tmp_path: Path, step: str) -> None:
    [problem] = _problems(
        registry, tmp_path, f"- {step}:{RECIPE_PARAMS.get(step, '')}\n", model="dgrun:tiny-sd"
    )

    assert problem.location == "optimize[0]"
    assert f"'{step}'" in problem.message and "transformer pipelines only" in problem.message
    assert "StableDiffusionPipeline" in problem.message and "UNet" in problem.message


@pytest.mark.parametrize(
    "first, second", [("pab", "taylor_seer"), ("mag_cache", "faster_cache"), ("first_block_cache", "pab")]
)
def test_two_caches_conflict(registry: Registry, tmp_path: Path, first: str, second: str) -> None:
    steps = f"- {first}:{RECIPE_PARAMS.get(first, '')}\n- {second}:{RECIPE_PARAMS.get(second, '')}\n"
    [problem] = _problems(registry, tmp_path, steps)

    assert problem.location == "optimize[1]"  # the later of the two
    assert f"step '{second}' conflicts with '{first}' (optimize[0])" in problem.message
    assert "keep only one" in problem.message


def test_xformers_conflicts_with_attention_backend(registry: Registry, tmp_path: Path) -> None:
    [problem] = _problems(registry, tmp_path, "- attention_backend: {backend: native}\n- xformers\n")

    assert problem.location == "optimize[1]"
    assert "'xformers' conflicts with 'attention_backend'" in problem.message


@pytest.mark.parametrize("step", CACHES)
def test_caches_must_come_after_fuse_qkv_and_before_compile(
    registry: Registry, tmp_path: Path, step: str
) -> None:
    steps = f"- compile\n- {step}:{RECIPE_PARAMS.get(step, '')}\n- fuse_qkv\n"
    problems = _problems(registry, tmp_path, steps)

    messages = [p.message for p in problems]
    assert any(f"step '{step}' must come before 'compile'" in m for m in messages), messages
    assert any(f"step 'fuse_qkv' must come before '{step}'" in m for m in messages), messages
    for problem in problems:
        assert _order(problem) == ["fuse_qkv", step, "compile"]


# ------------------------------------------------------------------------------------- compile flags
def test_compile_passes_inductor_flags_for_this_compile_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    pipe = tiny_pipeline("transformer")
    flags = {"epilogue_fusion": False, "coordinate_descent_search_radius": 2}
    params = CompileParams.model_validate({"mode": "max-autotune-no-cudagraphs", "inductor": flags})

    detail = Compile(params).apply(pipe, _ctx())

    [kwargs] = seen
    # torch.compile takes `mode` or `options`: the mode is spelled out as its inductor options.
    assert "mode" not in kwargs
    assert kwargs["options"] == {"max_autotune": True, "coordinate_descent_tuning": True, **flags}
    assert inductor_config.epilogue_fusion is True  # nothing process-wide changed
    assert "max-autotune-no-cudagraphs + " in detail
    assert "epilogue_fusion=False" in detail and "coordinate_descent_search_radius=2" in detail


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"epilogue_fuson": False}, "epilogue_fuson"),
        ({"epilogue_fusion": 1}, "Input should be a valid boolean"),
        ({"coordinate_descent_search_radius": True}, "Input should be a valid integer"),
        ({"cpp.cxx": "/tmp/evil.sh"}, "cpp.cxx"),
        ({"trace.debug_dir": "/tmp"}, "trace.debug_dir"),
        ({"triton.max_tiles": 9}, "less than or equal to 3"),
    ],
)
def test_compile_rejects_bad_or_unsafe_inductor_flags_when_validated(
    flags: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        CompileParams.model_validate({"inductor": flags})


def test_inductor_flags_need_the_inductor_backend() -> None:
    with pytest.raises(ValidationError, match="inductor flags need backend: inductor"):
        CompileParams(backend="aot_eager", inductor={"epilogue_fusion": False})
