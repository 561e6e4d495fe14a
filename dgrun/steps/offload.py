"""Offloading: keep weights in CPU memory and bring them to the accelerator only while they are needed.

All three steps set `places_modules`, so the runner loads the pipeline on the CPU and leaves the device
placement to them. Rules they share, and why:
- they exclude each other (the compatibility table in docs/steps.md: CPU offload ✗ sequential offload ✗ group
  offloading; diffusers also refuses model/sequential offload on a group-offloaded pipeline);
- they come after every step that changes how weights are stored or which layers exist (`after`), since
  the reverse order fails or silently undoes that step: sequential offload keeps the real weights in its
  own map and leaves meta tensors on the module; group offloading with streams copies every weight to
  pinned CPU memory when it is applied and puts those copies back at each offload (diffusers 0.42
  `_offload_to_memory`), so a later layerwise_casting / channels_last is reverted after the first block;
  and it hooks only the layers that exist then, so a later fuse_qkv adds layers that never reach the
  device. (quantize runs at load anyway; the rule keeps the recipe in the order it executes.)
- they are tagged `rewrites_modules` (their hooks wrap `forward`), so `compile` comes after them, the order
  diffusers documents and tests for compiling an offloaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_CHANGES_WEIGHTS,
    TAG_OFFLOAD,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Environment,
    NoParams,
    Optimizer,
    StepEffect,
    StepParams,
)

ACCELERATORS = frozenset({"cuda", "xpu", "mps"})
STREAM_DEVICES = frozenset({"cuda", "xpu"})


def module_components(pipe: Any) -> dict[str, Any]:
    """The pipeline's torch-module components (models, text encoders, VAE), by name."""
    import torch

    return {n: c for n, c in getattr(pipe, "components", {}).items() if isinstance(c, torch.nn.Module)}


def hooked_modules(pipe: Any, hook: str) -> int:
    """Modules carrying a diffusers hook named `hook`, or (hook="accelerate") an accelerate `_hf_hook`."""
    count = 0
    for component in module_components(pipe).values():
        for module in component.modules():
            if hook == "accelerate":
                count += hasattr(module, "_hf_hook")
            else:
                registry = getattr(module, "_diffusers_hook", None)
                count += registry is not None and registry.get_hook(hook) is not None
    return count


class _AcceleratorOffload(Optimizer[NoParams]):
    """Shared gate: accelerate's offload hooks move weights to an accelerator, so they need one."""

    tags = frozenset({TAG_OFFLOAD, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_OFFLOAD})
    after = frozenset({"#" + TAG_CHANGES_WEIGHTS})
    places_modules = True
    Params = NoParams

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        if env.device_kind not in ACCELERATORS:
            return f"needs an accelerator (CUDA, XPU or MPS) to offload to; this run uses {env.device_kind}"
        return None

    def effect(self, pipe: Any) -> StepEffect | None:
        hooked = hooked_modules(pipe, "accelerate")
        counters = {"modules_with_offload_hooks": hooked}
        if hooked == 0:
            return StepEffect(counters, "no offload hooks", no_effect="no module got an offload hook")
        return StepEffect(counters, f"{hooked} modules move between the CPU and the device")


class CpuOffload(_AcceleratorOffload):
    """Keep every model in CPU memory and move a whole model to the accelerator while it runs.

    Peak accelerator memory is the largest model (not all of them) at a moderate slowdown.
    """

    name = "cpu_offload"
    summary = "model CPU offload: one whole model on the accelerator at a time"

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        pipe.enable_model_cpu_offload(device=ctx.env.device)
        return f"models move to {ctx.env.device} one at a time"


class SequentialCpuOffload(_AcceleratorOffload):
    """Move each leaf layer to the accelerator only for its own forward: least memory, much slower."""

    name = "sequential_cpu_offload"
    summary = "sequential CPU offload: each layer on the accelerator only while it runs"

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        pipe.enable_sequential_cpu_offload(device=ctx.env.device)
        return f"layers move to {ctx.env.device} one at a time"


class GroupOffloadingParams(StepParams):
    offload_type: Literal["block_level", "leaf_level"] = Field(
        "block_level", description="block_level: groups of blocks; leaf_level: every leaf layer on its own"
    )
    num_blocks_per_group: int = Field(1, ge=1, description="blocks moved together (block_level only)")
    use_stream: bool = Field(
        False, description="prefetch the next group on a CUDA stream while the current one computes"
    )
    components: ComponentNames | None = Field(None, description="default: every torch-module component")


class GroupOffloading(Optimizer[GroupOffloadingParams]):
    """diffusers group offloading: groups of blocks (or leaf layers) move on and off the device as needed.

    Between model and sequential offloading in memory and speed; with `use_stream` the next group is
    copied while the current one computes. On a CPU run onload and offload device are both the CPU: the
    hooks are installed (and recorded) but nothing moves.
    """

    name = "group_offloading"
    summary = "diffusers group offloading (block or leaf level, optional CUDA streams)"
    Params = GroupOffloadingParams
    tags = frozenset({TAG_OFFLOAD, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_OFFLOAD})
    after = frozenset({"#" + TAG_CHANGES_WEIGHTS})
    places_modules = True

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        streams = isinstance(params, GroupOffloadingParams) and params.use_stream
        if streams and env.device_kind not in STREAM_DEVICES:
            return (
                f"use_stream: true needs a CUDA (or XPU) device for its transfer stream; this run uses "
                f"{env.device_kind} (use_stream: false works here)"
            )
        return None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        params = self.params
        available = module_components(pipe)
        targets = params.components or list(available)
        unknown = [n for n in targets if n not in available]
        if unknown:
            raise RuntimeError(
                f"{type(pipe).__name__} has no torch-module component {unknown[0]!r} "
                f"(it has: {', '.join(available)})"
            )
        onload = torch.device(ctx.env.device)
        block_level = params.offload_type == "block_level"
        per_group = params.num_blocks_per_group
        # The pipeline's own method also places every excluded component on the onload device, which the
        # runner left on the CPU because this step places modules itself.
        pipe.enable_group_offload(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type=params.offload_type,
            num_blocks_per_group=params.num_blocks_per_group
            if params.offload_type == "block_level"
            else None,
            use_stream=params.use_stream,
            exclude_modules=[n for n in available if n not in targets],
        )
        if params.use_stream:
            per_group = 1  # diffusers moves one block at a time when prefetching on a stream
        self.onload = onload
        level = f"block_level ({per_group} block{'s' if per_group > 1 else ''} per group)"
        if not block_level:
            level = "leaf_level"
        detail = f"{level} on {', '.join(targets)}: cpu ⇄ {onload}"
        if params.use_stream:
            detail += ", prefetching on a stream"
        if onload.type == "cpu":
            detail += " (a CPU run: hooks installed, nothing moves)"
        return detail

    def effect(self, pipe: Any) -> StepEffect | None:
        hooked = hooked_modules(pipe, "group_offloading")
        counters = {"modules_with_offload_hooks": hooked}
        summary = f"{hooked} modules with group offloading hooks"
        if hooked == 0:
            return StepEffect(counters, summary, no_effect="no module got a group offloading hook")
        if getattr(self, "onload", None) is not None and self.onload.type == "cpu":
            return StepEffect(
                counters, summary, no_effect="a CPU run: onload and offload device are the same"
            )
        return StepEffect(counters, summary)


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(CpuOffload)
    register(SequentialCpuOffload)
    register(GroupOffloading)
