"""diffusers' caches (`dgrun.steps.cache`): first_block_cache, pab, faster_cache, taylor_seer, and the
rules all transformer caches share (mag_cache's own tests are in test_mag_cache.py).

Each cache test shows the diffusers hook on the modules it should wrap, counts how often a module deep
inside the last transformer block really runs (a hook on the wrapped module itself would fire even when its
output comes from the cache), and compares the image with the uncached one. Images are float arrays on a
0-1 scale from a fixed seed; "close" means mean absolute difference below 0.01 (≈ 2.5 of 255 levels).
Rules (model kind, conflicts, order) are checked through the planner, without loading a model.

On `dgrun:default-dit`, an SD3 transformer that diffusers 0.42 gives no cache API, dgrun gives the model
`CacheMixin` and opens a cache context per call (`dgrun.steps.cache_context`); those tests show the step
applies and says so, the cached module runs less often, a second call repeats the first exactly, and the
picture still shows what the prompt asks for (the shapes evaluator) close to the uncached one.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun import metrics  # noqa: E402
from dgrun.errors import Problem  # noqa: E402
from dgrun.models import load_builtin, shapes  # noqa: E402
from dgrun.optimizer import Environment  # noqa: E402
from dgrun.plugins import build_registry  # noqa: E402
from dgrun.steps.attention import FuseQkv  # noqa: E402
from dgrun.steps.cache import (  # noqa: E402
    FasterCache,
    FirstBlockCache,
    PyramidAttentionBroadcast,
    TaylorSeer,
)
from dgrun.testing import (  # noqa: E402
    apply_context,
    cached_run,
    count_calls,
    diffusers_hooks,
    generate_array,
    last_block_mlp,
    plan_problem,
    plan_problems,
    run_recipe_data,
    tiny_pipeline,
)

PROMPT = "a red circle on a blue background"
STEPS = 8
CPU = Environment(device="cpu", device_kind="cpu")
CLOSE = 0.01  # mean absolute difference on the 0-1 scale
CACHES = ("pab", "faster_cache", "taylor_seer", "mag_cache")
# Params that make each cache valid in a recipe (mag_cache has no usable default ratios).
RECIPE_PARAMS = {"mag_cache": " {mag_ratios: flux}"}
ATTENTIONS = [
    "transformer_blocks.0.attn",
    "transformer_blocks.1.attn",
    "single_transformer_blocks.0.attn",
    "single_transformer_blocks.1.attn",
]

# diffusers' hook names (diffusers/hooks/first_block_cache.py) for the head block and the blocks after it.
FBC_HEAD_HOOK = "fbc_leader_block_hook"
FBC_BLOCK_HOOK = "fbc_block_hook"


def _last_attention_q(pipe: Any) -> torch.nn.Module:
    """A projection inside the last block's attention: it runs only when attention is really computed."""
    return pipe.transformer.single_transformer_blocks[-1].attn.to_q


# ------------------------------------------------------------------------------------ first_block_cache
def _fbc_hooks(pipe) -> tuple[object, object]:
    head = pipe.transformer.transformer_blocks[0]
    tail = pipe.transformer.single_transformer_blocks[-1]
    head_registry = getattr(head, "_diffusers_hook", None)
    tail_registry = getattr(tail, "_diffusers_hook", None)
    return (
        head_registry and head_registry.get_hook(FBC_HEAD_HOOK),
        tail_registry and tail_registry.get_hook(FBC_BLOCK_HOOK),
    )


def test_first_block_cache_skips_the_later_blocks(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    assert _fbc_hooks(pipe) == (None, None)

    FirstBlockCache(FirstBlockCache.Params(threshold=0.5)).apply(pipe, apply_context("transformer"))

    assert all(hook is not None for hook in _fbc_hooks(pipe))
    # A module inside the last block: it only runs when the block is computed, not served from the cache.
    # (A hook on the block itself would fire either way: diffusers replaces the block's `forward`.)
    inner = pipe.transformer.single_transformer_blocks[-1].attn
    with count_calls(inner) as calls:
        image = generate_array(pipe, PROMPT, 8)
    assert 1 <= calls[0] <= 2, f"the last block ran {calls[0]} of 8 steps"
    diff = np.abs(image - baseline("transformer", PROMPT, 8))
    assert diff.max() > 0, "reusing the cached residuals did not change the image at all"
    assert diff.mean() < 0.05

    # The cache state is per call: the runner's warm-up call does not leak into the next one.
    with count_calls(inner) as calls_again:
        again = generate_array(pipe, PROMPT, 8)
    assert calls_again[0] == calls[0]
    np.testing.assert_allclose(again, image, atol=1e-6, rtol=0)


def test_first_block_cache_recomputes_when_the_first_block_changes_a_lot(baseline) -> None:
    pipe = tiny_pipeline("transformer")

    FirstBlockCache(FirstBlockCache.Params(threshold=0.2)).apply(pipe, apply_context("transformer"))

    assert all(hook is not None for hook in _fbc_hooks(pipe))
    with count_calls(pipe.transformer.single_transformer_blocks[-1].attn) as calls:
        image = generate_array(pipe, PROMPT, 4)
    # Random weights change the first block's output by more than 20 % per step: nothing is skipped.
    assert calls[0] == 4
    np.testing.assert_allclose(image, baseline("transformer", PROMPT, 4), atol=1e-5, rtol=0)


def test_first_block_cache_after_fuse_qkv_still_skips() -> None:
    pipe = tiny_pipeline("transformer")
    FuseQkv(FuseQkv.Params()).apply(pipe, apply_context("transformer"))
    FirstBlockCache(FirstBlockCache.Params(threshold=0.5)).apply(pipe, apply_context("transformer"))

    with count_calls(pipe.transformer.single_transformer_blocks[-1].attn.to_qkv) as calls:
        generate_array(pipe, PROMPT, 8)
    assert 1 <= calls[0] <= 2


def test_first_block_cache_threshold_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        FirstBlockCache.Params(threshold=0)


# ------------------------------------------------------------------------------------------------- pab
def test_pab_reuses_attention_between_steps(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    detail = PyramidAttentionBroadcast(PyramidAttentionBroadcast.Params()).apply(
        pipe, apply_context("transformer")
    )

    assert detail == "spatial attention every 2 steps for timesteps in (100, 800)"
    assert diffusers_hooks(pipe.transformer, by_hook=True) == {"pyramid_attention_broadcast": ATTENTIONS}
    uncached = baseline("transformer", PROMPT, STEPS)
    calls, diff = cached_run(pipe, _last_attention_q(pipe), PROMPT, STEPS, uncached)
    # Every other step inside the timestep window (100, 800) reuses the attention output.
    assert calls < STEPS, f"attention ran on all {STEPS} steps"
    assert diff < CLOSE


# ---------------------------------------------------------------------------------------------- faster
def test_faster_cache_reuses_attention_on_a_guidance_distilled_pipeline(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    detail = FasterCache(FasterCache.Params()).apply(pipe, apply_context("transformer"))

    assert "guidance-distilled" in detail  # FLUX batches no unconditional branch: found automatically
    hooks = diffusers_hooks(pipe.transformer, by_hook=True)
    assert hooks["faster_cache_denoiser"] == [""]  # the transformer itself
    assert hooks["faster_cache_block"] == ATTENTIONS
    uncached = baseline("transformer", PROMPT, STEPS)
    calls, diff = cached_run(pipe, _last_attention_q(pipe), PROMPT, STEPS, uncached)
    assert calls < STEPS
    assert diff < CLOSE


def test_a_cache_that_fails_on_the_first_call_is_disabled_by_recover(baseline) -> None:
    # Declaring FLUX not guidance-distilled makes diffusers split a batch of one into [uncond, cond].
    pipe = tiny_pipeline("transformer")
    step = FasterCache(FasterCache.Params(is_guidance_distilled=False))
    step.apply(pipe, apply_context("transformer"))
    with pytest.raises((IndexError, ValueError)) as info:
        generate_array(pipe, PROMPT, STEPS)

    assert step.recover(pipe, RuntimeError("unrelated failure")) is None  # not raised inside the cache
    message = step.recover(pipe, info.value)

    assert message is not None and message.startswith("disabled: the cache failed on the first call")
    assert diffusers_hooks(pipe.transformer, by_hook=True) == {}
    np.testing.assert_allclose(
        generate_array(pipe, PROMPT, STEPS), baseline("transformer", PROMPT, STEPS), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------------------ taylor_seer
def test_taylor_seer_predicts_attention_outputs(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = TaylorSeer.Params(cache_interval=3, disable_cache_before_step=2, taylor_factors_dtype="float32")
    TaylorSeer(params).apply(pipe, apply_context("transformer"))

    assert diffusers_hooks(pipe.transformer, by_hook=True) == {"taylorseer_cache": ATTENTIONS}
    uncached = baseline("transformer", PROMPT, STEPS)
    calls, diff = cached_run(pipe, _last_attention_q(pipe), PROMPT, STEPS, uncached)
    # steps 0, 1 (warm-up), then one full step in three: 0, 1, 3, 6
    assert calls == 4
    assert diff < CLOSE


def test_taylor_seer_lite_mode_skips_whole_blocks(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = TaylorSeer.Params(cache_interval=3, disable_cache_before_step=2, use_lite_mode=True)
    TaylorSeer(params).apply(pipe, apply_context("transformer"))

    hooked = diffusers_hooks(pipe.transformer, by_hook=True)["taylorseer_cache"]
    assert "proj_out" in hooked and "single_transformer_blocks.1" in hooked
    uncached = baseline("transformer", PROMPT, STEPS)
    calls, diff = cached_run(pipe, last_block_mlp(pipe), PROMPT, STEPS, uncached)
    assert calls == 4
    assert diff < 2 * CLOSE  # extrapolating the final projection is coarser than extrapolating attention


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
    ],
)
def test_cache_params_are_checked(cls: Any, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        cls.Params(**params)


# ------------------------------------------------------------------------------------- planner rules
def _order(problem: Problem) -> list[str]:
    match = re.search(r"a valid order: ([a-z0-9_, ]+)", problem.message)
    assert match, problem.message
    return [name.strip() for name in match.group(1).split(",")]


@pytest.mark.parametrize("step", CACHES)
def test_transformer_caches_refuse_a_unet_pipeline(tmp_path: Path, step: str) -> None:
    steps = f"  - {step}:{RECIPE_PARAMS.get(step, '')}\n"
    problem = plan_problem(tmp_path, steps, CPU, model="dgrun:tiny-sd")

    assert problem.location == "optimize[0]"
    assert f"'{step}'" in problem.message and "transformer pipelines only" in problem.message
    assert "StableDiffusionPipeline" in problem.message and "UNet" in problem.message


@pytest.mark.parametrize(
    "first, second", [("pab", "taylor_seer"), ("mag_cache", "faster_cache"), ("first_block_cache", "pab")]
)
def test_two_caches_conflict(tmp_path: Path, first: str, second: str) -> None:
    steps = f"  - {first}:{RECIPE_PARAMS.get(first, '')}\n  - {second}:{RECIPE_PARAMS.get(second, '')}\n"
    problem = plan_problem(tmp_path, steps, CPU)

    assert problem.location == "optimize[1]"  # the later of the two
    assert f"step '{second}' conflicts with '{first}' (optimize[0])" in problem.message
    assert "keep only one" in problem.message


@pytest.mark.parametrize("step", CACHES)
def test_caches_must_come_after_fuse_qkv_and_before_compile(tmp_path: Path, step: str) -> None:
    steps = f"  - compile\n  - {step}:{RECIPE_PARAMS.get(step, '')}\n  - fuse_qkv\n"
    problems = plan_problems(tmp_path, steps, CPU)

    messages = [p.message for p in problems]
    assert any(f"step '{step}' must come before 'compile'" in m for m in messages), messages
    assert any(f"step 'fuse_qkv' must come before '{step}'" in m for m in messages), messages
    for problem in problems:
        assert _order(problem) == ["fuse_qkv", step, "compile"]


# ------------------------------------------------------------------------------- SD3 (default-dit)
SD3_PROMPT = "a yellow triangle on a blue background"
SD3_STEPS = 20  # the recipe default: TaylorSeer at its defaults loses the colour at 12 steps
# Near the uncached picture (each cache approximates: 23-38 dB at 20 steps); the evaluator still agrees.
MIN_PSNR = 20


@pytest.fixture(scope="module")
def sd3_template() -> Any:
    pipe = load_builtin("dgrun:default-dit", "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_uncached(sd3_template) -> np.ndarray:
    return _generate_sd3(sd3_template)


def _generate_sd3(pipe: Any) -> np.ndarray:
    """The image as 0-255 floats (the shapes evaluator and PSNR work on 8-bit pictures)."""
    generator = torch.Generator("cpu").manual_seed(3)
    image = pipe(SD3_PROMPT, num_inference_steps=SD3_STEPS, generator=generator).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _apply_sd3(template: Any, step: str, params: dict[str, Any]) -> tuple[Any, str]:
    pipe = copy.deepcopy(template)
    info = build_registry().get(step)
    ctx = apply_context("transformer", width=64, height=64)
    detail = info.cls(info.cls.Params.model_validate(params)).apply(pipe, ctx)
    return pipe, detail


def _sd3_attention(pipe: Any) -> torch.nn.Module:
    """A projection in the last block's attention: it runs only when attention is really computed."""
    return pipe.transformer.transformer_blocks[-1].attn.to_q


def _sd3_last_block_ff(pipe: Any) -> torch.nn.Module:
    """The last block's feed-forward: it runs only when the whole block is computed."""
    return pipe.transformer.transformer_blocks[-1].ff


@pytest.mark.parametrize(
    ("step", "params", "probe"),
    [
        ("pab", {}, _sd3_attention),
        ("faster_cache", {}, _sd3_attention),
        ("taylor_seer", {"taylor_factors_dtype": "float32"}, _sd3_attention),
        ("mag_cache", {"calibrate": True, "num_inference_steps": SD3_STEPS}, _sd3_last_block_ff),
    ],
)
def test_a_cache_runs_on_the_trained_sd3_model(sd3_template, sd3_uncached, step, params, probe):
    pipe, detail = _apply_sd3(sd3_template, step, params)
    assert "cache context opened per SD3Transformer2DModel call by dgrun" in detail
    with count_calls(probe(pipe)) as cached_runs:
        image = _generate_sd3(pipe)
    with count_calls(probe(pipe)) as repeat_runs:
        again = _generate_sd3(pipe)
    with count_calls(probe(sd3_template)) as full_runs:
        _generate_sd3(sd3_template)
    assert cached_runs[0] < full_runs[0], f"{step} computed everything ({cached_runs[0]} runs)"
    assert repeat_runs[0] == cached_runs[0]
    np.testing.assert_array_equal(again, image)
    assert metrics.psnr(sd3_uncached, image) >= MIN_PSNR
    assert all(shapes.check(SD3_PROMPT, image.astype(np.uint8)).values())


def test_disabling_the_cache_gives_back_the_uncached_pipeline(sd3_template, sd3_uncached):
    pipe, _ = _apply_sd3(sd3_template, "pab", {})
    _generate_sd3(pipe)
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(_generate_sd3(pipe), sd3_uncached)


def test_first_block_cache_is_refused_on_sd3_with_the_reason_and_an_alternative(sd3_template):
    with pytest.raises(RuntimeError) as refused:
        _apply_sd3(sd3_template, "first_block_cache", {})
    message = str(refused.value)
    assert "SD3Transformer2DModel" in message and "context_pre_only" in message
    assert "mag_cache" in message


def test_a_recipe_runs_a_cache_on_default_dit(tmp_path):
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:default-dit"},
            "generate": {"steps": 8},
            "prompts": [SD3_PROMPT],
            "optimize": [{"taylor_seer": {"taylor_factors_dtype": "float32"}}],
        },
    )
    assert record["status"] == "complete"
    (step,) = record["plan"]
    assert step["status"] == "applied" and "cache context" in step["detail"]
