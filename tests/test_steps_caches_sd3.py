"""diffusers' caches on `dgrun:default-dit`, an SD3 transformer that diffusers 0.42 gives no cache API.

dgrun gives the model `CacheMixin` and opens a cache context per call (`dgrun.steps.cache_context`), so
each test shows: the step applies and says so, the cached module really runs less often than uncached,
a second call repeats the first exactly (no state left over between calls), and the picture still shows
what the prompt asks for (the shapes evaluator) close to the uncached one.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun import metrics  # noqa: E402
from dgrun.models import load_builtin, shapes  # noqa: E402
from dgrun.optimizer import ApplyContext, Environment, ModelKind  # noqa: E402
from dgrun.plugins import build_registry  # noqa: E402
from dgrun.testing import count_calls, run_recipe_data  # noqa: E402

PROMPT = "a yellow triangle on a blue background"
STEPS = 20  # the recipe default: TaylorSeer at its defaults loses the colour at 12 steps
# Near the uncached picture (each cache approximates: 23-38 dB at 20 steps); the evaluator still agrees.
MIN_PSNR = 20


@pytest.fixture(scope="module")
def template() -> Any:
    pipe = load_builtin("dgrun:default-dit", "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def uncached(template) -> np.ndarray:
    return _generate(template)


def _generate(pipe: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    image = pipe(PROMPT, num_inference_steps=STEPS, generator=generator).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _apply(template: Any, step: str, params: dict[str, Any]) -> tuple[Any, str]:
    pipe = copy.deepcopy(template)
    info = build_registry().get(step)
    ctx = ApplyContext(Environment("cpu", "cpu", probed=True), ModelKind.TRANSFORMER, torch.float32, 64, 64)
    detail = info.cls(info.cls.Params.model_validate(params)).apply(pipe, ctx)
    return pipe, detail


def _attention(pipe: Any) -> torch.nn.Module:
    """A projection in the last block's attention: it runs only when attention is really computed."""
    return pipe.transformer.transformer_blocks[-1].attn.to_q


def _last_block_ff(pipe: Any) -> torch.nn.Module:
    """The last block's feed-forward: it runs only when the whole block is computed."""
    return pipe.transformer.transformer_blocks[-1].ff


@pytest.mark.parametrize(
    ("step", "params", "probe"),
    [
        ("pab", {}, _attention),
        ("faster_cache", {}, _attention),
        ("taylor_seer", {"taylor_factors_dtype": "float32"}, _attention),
        ("mag_cache", {"calibrate": True, "num_inference_steps": STEPS}, _last_block_ff),
    ],
)
def test_a_cache_runs_on_the_trained_sd3_model(template, uncached, step, params, probe):
    pipe, detail = _apply(template, step, params)
    assert "cache context opened per SD3Transformer2DModel call by dgrun" in detail
    with count_calls(probe(pipe)) as cached_runs:
        image = _generate(pipe)
    with count_calls(probe(pipe)) as repeat_runs:
        again = _generate(pipe)
    with count_calls(probe(template)) as full_runs:
        _generate(template)
    assert cached_runs[0] < full_runs[0], f"{step} computed everything ({cached_runs[0]} runs)"
    assert repeat_runs[0] == cached_runs[0]
    np.testing.assert_array_equal(again, image)
    assert metrics.psnr(uncached, image) >= MIN_PSNR
    assert all(shapes.check(PROMPT, image.astype(np.uint8)).values())


def test_disabling_the_cache_gives_back_the_uncached_pipeline(template, uncached):
    pipe, _ = _apply(template, "pab", {})
    _generate(pipe)
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(_generate(pipe), uncached)


def test_first_block_cache_is_refused_with_the_reason_and_an_alternative(template):
    with pytest.raises(RuntimeError) as refused:
        _apply(template, "first_block_cache", {})
    message = str(refused.value)
    assert "SD3Transformer2DModel" in message and "context_pre_only" in message
    assert "mag_cache" in message


def test_a_recipe_runs_a_cache_on_default_dit(tmp_path):
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:default-dit"},
            "generate": {"steps": 8},
            "prompts": [PROMPT],
            "optimize": [{"taylor_seer": {"taylor_factors_dtype": "float32"}}],
        },
    )
    assert record["status"] == "complete"
    (step,) = record["plan"]
    assert step["status"] == "applied" and "cache context" in step["detail"]
