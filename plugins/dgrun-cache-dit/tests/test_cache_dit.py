"""The `cache_dit` plugin step on the tiny FLUX pipeline, applied directly, through the planner and a run.

Images are float arrays on a 0-1 scale from a fixed seed; every test builds its own pipeline because the
step rewires the pipeline it is given. The tiny FLUX transformer has 2 + 2 blocks, so Fn/Bn stay small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("cache_dit")

from dgrun_cache_dit import CacheDit, CacheDitParams  # noqa: E402

from dgrun.optimizer import Environment  # noqa: E402
from dgrun.plugins import build_registry  # noqa: E402
from dgrun.testing import (  # noqa: E402
    apply_context,
    cached_run,
    count_calls,
    generate_array,
    last_block_mlp,
    plan_problem,
    run_recipe_data,
    tiny_pipeline,
)

PROMPT = "a red circle on a blue background"
STEPS = 8
CPU = Environment(device="cpu", device_kind="cpu")
# First block decides, nothing cached during the first two steps; random weights need a loose threshold.
FAST = {"fn_compute_blocks": 1, "max_warmup_steps": 2, "residual_diff_threshold": 0.5}


@pytest.fixture(scope="module")
def baseline() -> np.ndarray:
    return generate_array(tiny_pipeline("transformer"), PROMPT, STEPS)


def test_cache_dit_reuses_the_middle_blocks(baseline: np.ndarray) -> None:
    from diffusers import FluxPipeline

    pipe = tiny_pipeline("transformer")
    detail = CacheDit(CacheDitParams(**FAST)).apply(pipe, apply_context("transformer"))

    assert detail == "F1B0 of 4 blocks, threshold 0.5, warmup 2"
    assert isinstance(pipe, FluxPipeline) and type(pipe).__name__ == "FluxPipeline"
    assert type(pipe).__call__ is not FluxPipeline.__call__  # cache-dit's per-call context wrapper ...
    assert "_original_call" not in vars(FluxPipeline)  # ... on this pipeline's own class only
    # Also checks that the cache context is reset per call (a second call repeats the first exactly: the
    # runner's warm-up call does not leak into the next one) and that reusing blocks changed the image.
    calls, diff = cached_run(pipe, last_block_mlp(pipe), PROMPT, STEPS, baseline)
    assert calls < STEPS, f"the last block ran on all {STEPS} steps"
    assert calls >= 2  # the warm-up steps always compute
    assert diff < 0.02

    # Another pipeline of the same class in this process is not touched.
    other = tiny_pipeline("transformer")
    with count_calls(last_block_mlp(other)) as other_calls:
        np.testing.assert_allclose(generate_array(other, PROMPT, STEPS), baseline, atol=1e-6, rtol=0)
    assert other_calls[0] == STEPS


def test_a_zero_threshold_never_reuses(baseline: np.ndarray) -> None:
    pipe = tiny_pipeline("transformer")
    CacheDit(CacheDitParams(**{**FAST, "residual_diff_threshold": 1e-9})).apply(
        pipe, apply_context("transformer")
    )

    with count_calls(last_block_mlp(pipe)) as calls:
        image = generate_array(pipe, PROMPT, STEPS)

    assert calls[0] == STEPS
    np.testing.assert_allclose(image, baseline, atol=1e-5, rtol=0)


def test_taylorseer_forecasting_is_passed_to_cache_dit() -> None:
    pipe = tiny_pipeline("transformer")
    detail = CacheDit(CacheDitParams(**FAST, taylorseer_order=1)).apply(pipe, apply_context("transformer"))

    assert detail.endswith("TaylorSeer order 1")
    with count_calls(last_block_mlp(pipe)) as calls:
        generate_array(pipe, PROMPT, STEPS)
    assert calls[0] < STEPS


def test_more_compute_blocks_than_the_model_has_is_refused_before_patching() -> None:
    from diffusers import FluxPipeline

    pipe = tiny_pipeline("transformer")
    with pytest.raises(ValueError, match=r"fn_compute_blocks \+ bn_compute_blocks = 8 but .* has 4 blocks"):
        CacheDit(CacheDitParams()).apply(pipe, apply_context("transformer"))  # cache-dit's default F8B0
    assert type(pipe) is FluxPipeline


def test_a_pipeline_cache_dit_does_not_know_is_refused() -> None:
    pipe = tiny_pipeline("unet")
    with pytest.raises(RuntimeError, match="cache-dit has no block adapter for StableDiffusionPipeline"):
        CacheDit(CacheDitParams(**FAST)).apply(pipe, apply_context("transformer"))


def test_recover_releases_cache_dit_after_a_failure_inside_it(baseline: np.ndarray) -> None:
    pipe = tiny_pipeline("transformer")
    step = CacheDit(CacheDitParams(**FAST))
    step.apply(pipe, apply_context("transformer"))
    assert step.recover(pipe, RuntimeError("not from cache-dit")) is None
    import cache_dit

    with pytest.raises(ValueError) as info:
        cache_dit.enable_cache(None)  # any error whose traceback runs through cache-dit's code

    message = step.recover(pipe, info.value)

    assert message is not None and message.startswith("disabled: cache-dit failed on the first call")
    np.testing.assert_allclose(generate_array(pipe, PROMPT, STEPS), baseline, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"fn_compute_blocks": 0},
        {"residual_diff_threshold": 0},
        {"max_warmup_steps": 8, "num_inference_steps": 8},
    ],
)
def test_params_are_checked(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CacheDitParams(**params)


# ------------------------------------------------------------------------------- registry and planner
def test_plugin_is_found_through_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGRUN_LOAD_PLUGINS", raising=False)
    registry = build_registry()

    info = registry.get("cache_dit")
    assert info is not None and info.cls is CacheDit
    assert info.distribution == "dgrun-cache-dit"
    assert CacheDit.unavailable_reason(CPU) is None


def test_planner_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGRUN_LOAD_PLUGINS", raising=False)

    unet = plan_problem(tmp_path, "  - cache_dit\n", CPU, "dgrun:tiny-sd").message
    assert "'cache_dit' works on transformer pipelines only" in unet and "StableDiffusionPipeline" in unet
    conflict = plan_problem(
        tmp_path, "  - first_block_cache\n  - cache_dit\n", CPU, "dgrun:tiny-flux"
    ).message
    assert "step 'cache_dit' conflicts with 'first_block_cache'" in conflict
    order = plan_problem(tmp_path, "  - cache_dit\n  - fuse_qkv\n", CPU, "dgrun:tiny-flux").message
    assert (
        "step 'fuse_qkv' must come before 'cache_dit'" in order
        and "a valid order: fuse_qkv, cache_dit" in order
    )


def test_recipe_run_applies_cache_dit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGRUN_LOAD_PLUGINS", raising=False)

    record = run_recipe_data(
        tmp_path,
        {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": STEPS}, "optimize": [{"cache_dit": FAST}]},
    )

    assert record["status"] == "complete"
    [entry] = record["plan"]
    assert entry["status"] == "applied" and entry["detail"] == "F1B0 of 4 blocks, threshold 0.5, warmup 2"
    assert entry["plugin"].startswith("dgrun-cache-dit")
    assert record["model"]["pipeline_class"] == "FluxPipeline"
    assert len(record["images"]) == 2
