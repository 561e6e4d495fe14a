"""VAE memory savers: decode a batch one image at a time, or an image tile by tile."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dgrun.optimizer import ApplyContext, NoParams, Optimizer, StepParams


def _vae(pipe: Any) -> Any:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise RuntimeError(f"{type(pipe).__name__} has no `vae` component")
    return vae


class VaeSlicing(Optimizer):
    """Decode the latents of a batch one image at a time: lower peak memory for large batches."""

    name = "vae_slicing"
    summary = "VAE decodes a batch one image at a time (less peak memory)"
    Params = NoParams

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        _vae(pipe).enable_slicing()
        return None


class VaeTilingParams(StepParams):
    auto_above: int | None = Field(
        None, ge=8, description="only tile images wider or taller than this many pixels (seed figure: 1536)"
    )


class VaeTiling(Optimizer):
    """Decode large images tile by tile (overlapping, blended): memory stays flat as resolution grows."""

    name = "vae_tiling"
    summary = "VAE decodes tile by tile (flat memory for large images)"
    Params = VaeTilingParams

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        threshold = self.params.auto_above
        largest = max(ctx.width or 0, ctx.height or 0)
        if threshold is not None and largest <= threshold:
            return f"not enabled: {ctx.width}x{ctx.height} is not above auto_above={threshold}"
        _vae(pipe).enable_tiling()
        return None


OPTIMIZERS: tuple[type[Optimizer], ...] = (VaeSlicing, VaeTiling)
