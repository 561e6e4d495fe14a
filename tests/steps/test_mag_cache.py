"""The mag_cache step (`dgrun.steps.mag_cache`) on the tiny FLUX pipeline: skipped blocks, ratios resampled
to each call's step count, calibration, params.

The rules it shares with the other transformer caches (model kind, conflicts, order) and its run on the
SD3 `dgrun:default-dit` are tested with them in test_cache.py. Images are float arrays on a 0-1 scale from
a fixed seed; "close" means mean absolute difference below 0.01.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.steps.mag_cache import MagCache  # noqa: E402
from dgrun.testing import (  # noqa: E402
    apply_context,
    cached_run,
    count_calls,
    diffusers_hooks,
    generate_array,
    last_block_mlp,
    tiny_pipeline,
)

PROMPT = "a red circle on a blue background"
STEPS = 8
CLOSE = 0.01  # mean absolute difference on the 0-1 scale


def test_mag_cache_skips_blocks_and_follows_each_calls_step_count(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    step = MagCache(MagCache.Params(mag_ratios="flux", threshold=0.3))
    detail = step.apply(pipe, apply_context("transformer"))

    assert detail == "threshold 0.3, mag_ratios flux (28 values), resampled to each call's steps"
    hooks = diffusers_hooks(pipe.transformer, by_hook=True)
    assert hooks["mag_cache_leader_block_hook"] == ["transformer_blocks.0"]
    assert hooks["mag_cache_block_hook"] == [
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    uncached = baseline("transformer", PROMPT, STEPS)
    calls, diff = cached_run(pipe, last_block_mlp(pipe), PROMPT, STEPS, uncached)
    assert calls < STEPS
    assert diff < CLOSE
    # The 28 FLUX ratios were resampled to this call's 8 steps, and follow a call with 12.
    assert step.config.num_inference_steps == STEPS and len(step.config.mag_ratios) == STEPS
    generate_array(pipe, PROMPT, 12)
    assert step.config.num_inference_steps == 12 and len(step.config.mag_ratios) == 12


def test_mag_cache_calibrates_its_ratios_with_one_uncached_call() -> None:
    pipe = tiny_pipeline("transformer")
    step = MagCache(MagCache.Params(calibrate=True, num_inference_steps=STEPS, threshold=0.5))
    with count_calls(last_block_mlp(pipe)) as calls:
        detail = step.apply(pipe, apply_context("transformer"))

    assert calls[0] == STEPS  # the calibration call computed every block of every step
    assert detail.startswith(f"threshold 0.5, calibrated on {STEPS} steps: mag_ratios [1.0, ")
    assert len(step.ratios) == STEPS and all(r > 0 for r in step.ratios)
    assert "mag_cache_leader_block_hook" in diffusers_hooks(pipe.transformer, by_hook=True)
    with count_calls(last_block_mlp(pipe)) as calls:
        generate_array(pipe, PROMPT, STEPS)
    assert calls[0] < STEPS


def test_mag_cache_without_ratios_or_calibration_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"give mag_ratios .* or calibrate: true"):
        MagCache.Params()
    with pytest.raises(ValidationError, match="not both"):
        MagCache.Params(mag_ratios=[1.0, 0.9], calibrate=True)


@pytest.mark.parametrize("params", [{"mag_ratios": [1.0, -0.5]}])
def test_mag_cache_params_are_checked(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MagCache.Params(**params)
