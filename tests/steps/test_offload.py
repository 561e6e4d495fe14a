"""Offloading steps (`dgrun.steps.offload`): cpu_offload, sequential_cpu_offload, group_offloading.

Group offloading works on a CPU too: its tests show the diffusers hooks it installs and that the images
(float arrays on a 0-1 scale from a fixed seed) stay those of an untouched pipeline. The CPU offloads need
an accelerator: they are checked for the reason they give on a CPU, the "skipped" record a run makes of
them, and the device they pass to diffusers. Rule tests plan recipes the way `dgrun check` does and assert
the message names both steps and an order that satisfies every rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun.optimizer import Environment, matches  # noqa: E402
from dgrun.plugins import Registry  # noqa: E402
from dgrun.steps.offload import CpuOffload, GroupOffloading, SequentialCpuOffload  # noqa: E402
from dgrun.steps.runtime import CudaMemory  # noqa: E402
from dgrun.testing import (  # noqa: E402
    apply_context,
    diffusers_hooks,
    generate_array,
    plan_problem,
    plan_steps,
    run_recipe_data,
    tiny_pipeline,
)

CPU = Environment(device="cpu", device_kind="cpu")
CUDA = Environment(device="cuda:1", device_kind="cuda", cuda_capability=(9, 0))
PROMPT = "a red circle on a blue background"
STEPS = 2
GROUP_HOOK = "group_offloading"  # diffusers/hooks/group_offloading.py _GROUP_OFFLOADING
OFFLOADS = ["cpu_offload", "sequential_cpu_offload", "group_offloading"]


# ---------------------------------------------------------------------------- gates of CUDA-only steps
ACCELERATOR_REASON = "needs an accelerator (CUDA, XPU or MPS) to offload to; this run uses cpu"
STREAM_REASON = "use_stream: true needs a CUDA (or XPU) device"


def test_cuda_only_steps_give_their_reason_on_a_cpu() -> None:
    assert CpuOffload.unavailable_reason(CPU, CpuOffload.Params()) == ACCELERATOR_REASON
    assert SequentialCpuOffload.unavailable_reason(CPU, SequentialCpuOffload.Params()) == ACCELERATOR_REASON
    assert CudaMemory.unavailable_reason(CPU, CudaMemory.Params()) == "needs a CUDA device; this run uses cpu"
    streamed = GroupOffloading.Params(use_stream=True)
    assert STREAM_REASON in GroupOffloading.unavailable_reason(CPU, streamed)
    # ... and none of them on a GPU; group offloading without streams works on a CPU too
    for cls in (CpuOffload, SequentialCpuOffload, CudaMemory):
        assert cls.unavailable_reason(CUDA, cls.Params()) is None
    assert GroupOffloading.unavailable_reason(CUDA, streamed) is None
    assert GroupOffloading.unavailable_reason(CPU, GroupOffloading.Params()) is None


@pytest.mark.parametrize(
    ("steps", "reasons"),
    [
        (["cuda_memory", "cpu_offload"], ["needs a CUDA device", ACCELERATOR_REASON]),
        (["sequential_cpu_offload"], [ACCELERATOR_REASON]),
        ([{"group_offloading": {"use_stream": True}}], [STREAM_REASON]),
    ],
)
def test_a_run_skips_cuda_only_steps_and_records_why(tmp_path: Path, steps: list, reasons: list[str]) -> None:
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:tiny-flux"},
            "generate": {"steps": 1, "extra": {"max_sequence_length": 16}},
            "prompts": [PROMPT],
            "on_unavailable": "skip",
            "optimize": steps,
        },
    )
    assert record["status"] == "complete"
    assert [entry["status"] for entry in record["plan"]] == ["skipped"] * len(steps)
    for entry, reason in zip(record["plan"], reasons, strict=True):
        assert reason in entry["detail"]


class _OffloadablePipe:
    """Records how the offload steps call diffusers (real offloading needs an accelerator)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def enable_model_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("model", kwargs))

    def enable_sequential_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("sequential", kwargs))


def test_cpu_offloads_target_the_runs_device() -> None:
    pipe = _OffloadablePipe()
    assert "cuda:1" in CpuOffload(CpuOffload.Params()).apply(pipe, apply_context(device="cuda:1"))
    SequentialCpuOffload(SequentialCpuOffload.Params()).apply(pipe, apply_context(device="cuda:1"))
    assert pipe.calls == [("model", {"device": "cuda:1"}), ("sequential", {"device": "cuda:1"})]
    assert (
        CpuOffload.places_modules and SequentialCpuOffload.places_modules and GroupOffloading.places_modules
    )


# ------------------------------------------------------------------------------------- group_offloading
def test_group_offloading_block_level_hooks_each_block_and_keeps_the_output(baseline) -> None:
    pipe = tiny_pipeline("unet")
    detail = GroupOffloading(GroupOffloading.Params()).apply(pipe, apply_context("unet"))

    hooks = diffusers_hooks(pipe.unet)
    # one group per top-level block, plus the module itself for the layers outside any block list
    for block in ("down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"):
        assert hooks.get(block) == [GROUP_HOOK]
    assert GROUP_HOOK in hooks[""]
    assert not any(name.startswith("down_blocks.0.") for name in hooks)  # blocks move as a whole
    for component in ("vae", "text_encoder"):  # every torch-module component by default
        assert any(GROUP_HOOK in names for names in diffusers_hooks(getattr(pipe, component)).values())
    assert "block_level" in detail and "nothing moves" in detail
    np.testing.assert_allclose(
        generate_array(pipe, PROMPT, STEPS), baseline("unet", PROMPT, STEPS), atol=1e-6
    )


def test_group_offloading_leaf_level_on_chosen_components(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = GroupOffloading.Params(offload_type="leaf_level", components=["transformer"])
    GroupOffloading(params).apply(pipe, apply_context("transformer"))

    hooks = diffusers_hooks(pipe.transformer)
    leaves = [
        name
        for name, m in pipe.transformer.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.LayerNorm)
        and next(m.parameters(), None) is not None
    ]
    assert leaves and all(hooks.get(name, []).count(GROUP_HOOK) == 1 for name in leaves)
    assert diffusers_hooks(pipe.text_encoder) == {}  # not among the chosen components
    np.testing.assert_allclose(
        generate_array(pipe, PROMPT, STEPS), baseline("transformer", PROMPT, STEPS), atol=1e-6
    )


def test_group_offloading_params_and_unknown_component() -> None:
    with pytest.raises(ValueError):
        GroupOffloading.Params(num_blocks_per_group=0)
    with pytest.raises(ValueError):
        GroupOffloading.Params(offload_type="model_level")
    step = GroupOffloading(GroupOffloading.Params(components=["unet"]))
    with pytest.raises(RuntimeError, match="no torch-module component 'unet'"):
        step.apply(tiny_pipeline("transformer"), apply_context("transformer"))


# ------------------------------------------------------------------------------------------------ rules
def assert_valid_order(registry: Registry, message: str, expected: set[str]) -> None:
    """The message's suggested order holds every step and breaks no `after` rule."""
    found = re.search(r"a valid order: ([a-z0-9_, ]+)", message)
    assert found, message
    order = found.group(1).split(", ")
    assert set(order) == expected
    for position, name in enumerate(order):
        cls = registry.get(name).cls
        later = [registry.get(other).cls for other in order[position + 1 :]]
        assert not any(matches(rule, other) for rule in cls.after for other in later), order


@pytest.mark.parametrize(
    ("first", "second"), [(a, b) for a in OFFLOADS for b in OFFLOADS if a != b], ids=lambda s: s
)
def test_offloads_conflict_with_each_other(tmp_path: Path, first: str, second: str) -> None:
    message = plan_problem(tmp_path, f"  - {first}\n  - {second}\n", CPU).message
    assert f"step '{second}' conflicts with '{first}'" in message


@pytest.mark.parametrize("weights_step", ["channels_last", "layerwise_casting", "fuse_qkv", "quantize"])
@pytest.mark.parametrize("offload", OFFLOADS)
def test_offloads_come_after_steps_that_change_weights(
    registry: Registry, tmp_path: Path, offload: str, weights_step: str
) -> None:
    message = plan_problem(tmp_path, f"  - {offload}\n  - {weights_step}\n", CPU).message
    assert f"step '{weights_step}' must come before '{offload}'" in message
    assert_valid_order(registry, message, {offload, weights_step})
    # the suggested order plans cleanly
    plan_steps(tmp_path, f"  - {weights_step}\n  - {offload}\n", CPU)


@pytest.mark.parametrize("step", [*OFFLOADS, "layerwise_casting"])
def test_compile_comes_after_module_rewriting_memory_steps(
    registry: Registry, tmp_path: Path, step: str
) -> None:
    message = plan_problem(tmp_path, f"  - compile\n  - {step}\n", CPU).message
    assert f"step '{step}' must come before 'compile'" in message
    assert_valid_order(registry, message, {step, "compile"})


def test_a_full_memory_recipe_in_a_valid_order_plans(tmp_path: Path) -> None:
    steps = "  - channels_last\n  - layerwise_casting\n  - group_offloading\n  - compile\n"
    plan = plan_steps(tmp_path, steps, CPU, model="dgrun:tiny-sd")
    assert all(s.outlook() == "will apply" for s in plan.steps)
