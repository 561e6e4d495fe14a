"""Storage precision and memory layout of weights: fp8 layerwise casting, channels-last convolutions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dgrun.optimizer import TAG_REWRITES_MODULES, ApplyContext, ComponentNames, Optimizer, StepParams
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


class LayerwiseCasting(Optimizer):
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
    tags = frozenset({TAG_REWRITES_MODULES})
    conflicts = frozenset({"quantize"})

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
            done.append(f"{component_name} ({stored / max(total, 1):.0%} of weights)")
        compute_name = self.params.compute_dtype or str(ctx.dtype).removeprefix("torch.")
        return f"{self.params.storage_dtype} storage, {compute_name} compute: {', '.join(done)}"


class ChannelsLastParams(StepParams):
    components: ComponentNames | None = Field(None, description="default: the denoiser and the VAE")


class ChannelsLast(Optimizer):
    """Lay 4-D weights out channels-last (NHWC), the layout cuDNN's and inductor's fastest convolution
    kernels use; activations follow the weights' layout.

    Not tagged `rewrites_modules`: it replaces no module and wraps no forward, it only changes parameter
    strides, and torch.compile traces lazily at the first pipeline call, after every step has been applied,
    so it sees the new layout whatever the recipe order. Offloads must come after it (see offload.py).
    """

    name = "channels_last"
    summary = "channels-last (NHWC) memory format for convolution weights"
    Params = ChannelsLastParams

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        names = self.params.components
        if names is None:
            names = [denoiser_name(pipe)] + (["vae"] if getattr(pipe, "vae", None) is not None else [])
        done = []
        for component_name, module in components(pipe, names):
            module.to(memory_format=torch.channels_last)
            convs = sum(1 for p in module.parameters() if p.dim() == 4)
            done.append(f"{component_name} ({convs} conv weights)")
        return ", ".join(done)


OPTIMIZERS: tuple[type[Optimizer], ...] = (LayerwiseCasting, ChannelsLast)
