"""Storage precision and memory layout of weights: fp8 layerwise casting, channels-last convolutions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_CHANGES_WEIGHTS,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Optimizer,
    StepEffect,
    StepParams,
)
from dgrun.steps.denoiser import components, denoiser_name

DTYPE_NAMES = Literal["float32", "float16", "bfloat16"]


class LayerwiseCastingParams(StepParams):
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = Field(
        "float8_e4m3fn", description="dtype the weights are kept in between uses"
    )
    compute_dtype: DTYPE_NAMES | None = Field(
        None, description="dtype each layer computes in (null: the model's dtype, which it must match)"
    )
    components: ComponentNames | None = Field(None, description="default: the denoiser")


class LayerwiseCasting(Optimizer[LayerwiseCastingParams]):
    """Store weights in fp8 and upcast each layer just for its forward: about half the weight memory of
    bf16 at a small quality cost (diffusers keeps norms and embeddings in full precision).

    Its hooks wrap every layer's forward, hence `rewrites_modules` (compile comes after it). It conflicts
    with `quantize`, which also decides how weights are stored: on this stack layerwise casting cannot
    re-cast quanto's weight tensors ("The dtype of a weights Tensor cannot be changed") and torchao cannot
    quantize fp8-stored weights (no fp8 min/max kernel on CPU); quantize runs at load, so first.
    """

    name = "layerwise_casting"
    summary = "weights stored in fp8, upcast per layer for compute (diffusers layerwise casting)"
    Params = LayerwiseCastingParams
    tags = frozenset({TAG_REWRITES_MODULES, TAG_CHANGES_WEIGHTS})
    conflicts = frozenset({"quantize"})
    # fuse_qkv concatenates weights that layerwise casting already stores in fp8 (fails at apply).
    after = frozenset({"fuse_qkv"})

    def __init__(self, params: LayerwiseCastingParams):
        super().__init__(params)
        self.stored: dict[str, tuple[int, int]] = {}

    def effect(self, pipe: Any) -> StepEffect | None:
        stored = sum(s for s, _ in self.stored.values())
        total = sum(t for _, t in self.stored.values())
        counters = {"weights_in_storage_dtype": stored, "weights": total}
        summary = f"{stored / max(total, 1):.0%} of {total} weights stored in {self.params.storage_dtype}"
        if stored == 0:
            return StepEffect(counters, summary, no_effect="no weight is stored in the storage dtype")
        return StepEffect(counters, summary)

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        storage = getattr(torch, self.params.storage_dtype)
        done = []
        for component_name, module in components(pipe, self.params.components):
            model_dtype = getattr(module, "dtype", None) or ctx.dtype
            compute = getattr(torch, self.params.compute_dtype) if self.params.compute_dtype else model_dtype
            if compute != model_dtype:
                # Activations arrive in the model's dtype; the layer would then mix two dtypes and fail.
                raise RuntimeError(
                    f"compute_dtype {self.params.compute_dtype} differs from the dtype of {component_name} "
                    f"({str(model_dtype).removeprefix('torch.')}): set model.dtype instead, or leave "
                    "compute_dtype unset"
                )
            if hasattr(module, "enable_layerwise_casting"):
                module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
            else:  # a non-diffusers module (e.g. a text encoder): the hook function with default skips
                from diffusers.hooks import apply_layerwise_casting

                apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=compute)
            stored = sum(p.numel() for p in module.parameters() if p.dtype == storage)
            total = sum(p.numel() for p in module.parameters())
            self.stored[component_name] = (stored, total)
            done.append(f"{component_name} ({stored / max(total, 1):.0%} of weights)")
        compute_name = self.params.compute_dtype or str(ctx.dtype).removeprefix("torch.")
        return f"{self.params.storage_dtype} storage, {compute_name} compute: {', '.join(done)}"


class ChannelsLastParams(StepParams):
    components: ComponentNames | None = Field(None, description="default: the denoiser and the VAE")


class ChannelsLast(Optimizer[ChannelsLastParams]):
    """Lay 4-D weights out channels-last (NHWC), the layout cuDNN's and inductor's fastest convolution
    kernels use; activations follow the weights' layout.

    Not tagged `rewrites_modules`: it replaces no module and wraps no forward, it only changes parameter
    strides, and torch.compile traces lazily at the first pipeline call, after every step has been applied,
    so it sees the new layout whatever the recipe order. Offloads must come after it (see offload.py).
    """

    name = "channels_last"
    tags = frozenset({TAG_CHANGES_WEIGHTS})
    summary = "channels-last (NHWC) memory format for convolution weights"
    Params = ChannelsLastParams

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        names = self.params.components
        if names is None:
            names = [denoiser_name(pipe)] + (["vae"] if getattr(pipe, "vae", None) is not None else [])
        done = []
        self.modules = []
        for component_name, module in components(pipe, names):
            module.to(memory_format=torch.channels_last)
            convs = sum(1 for p in module.parameters() if p.dim() == 4)
            self.modules.append(module)
            done.append(f"{component_name} ({convs} conv weights)")
        return ", ".join(done)

    def effect(self, pipe: Any) -> StepEffect | None:
        import torch

        weights = [p for m in getattr(self, "modules", []) for p in m.parameters() if p.dim() == 4]
        laid_out = sum(1 for p in weights if p.is_contiguous(memory_format=torch.channels_last))
        counters = {"conv_weights": len(weights), "channels_last": laid_out}
        summary = f"{laid_out} of {len(weights)} conv weights channels-last"
        if laid_out == 0:
            return StepEffect(counters, summary, no_effect="no convolution weight is channels-last")
        return StepEffect(counters, summary)


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(LayerwiseCasting)
    register(ChannelsLast)
