"""dgrun plugin template: the `freeu` step, diffusers' FreeU on UNet pipelines.

Copy this package to start a plugin of your own (see README.md). It holds one real, small step:

FreeU (Si et al., "FreeU: Free Lunch in Diffusion U-Net", CVPR 2024) re-weights the two contributions a
UNet decoder block adds together: it amplifies the backbone features (`b1`, `b2`: more detail and better
structure) and damps the low frequencies of the skip connections (`s1`, `s2`: against the over-smoothing
the amplification would cause). It needs no training, no extra memory and almost no time: a few
multiplications and one FFT of the skip features in the two lowest-resolution decoder blocks. diffusers
implements it; the step only switches it on with values chosen in the recipe, so they are recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from dgrun import ApplyContext, ModelKind, Optimizer, StepEffect, StepParams, hookimpl

__version__ = "0.1.0"

FREEU_ATTRIBUTES = ("s1", "s2", "b1", "b2")


class FreeUParams(StepParams):
    """FreeU's four factors. The defaults are the FreeU authors' values for Stable Diffusion 1.5.

    Every factor must be positive: diffusers switches FreeU off silently when any of them is 0.
    """

    s1: float = Field(0.9, gt=0, description="stage 1: scale of the skip features' low frequencies")
    s2: float = Field(0.2, gt=0, description="stage 2: scale of the skip features' low frequencies")
    b1: float = Field(1.5, gt=0, description="stage 1: scale of the backbone features")
    b2: float = Field(1.6, gt=0, description="stage 2: scale of the backbone features")


class FreeU(Optimizer[FreeUParams]):
    """Switch on diffusers' FreeU: stronger backbone features, damped skip features, in the UNet decoder.

    Why these rules:
    - `applies_to` UNet: FreeU acts on the skip connections of a UNet's up blocks; a transformer has none,
      so a recipe putting it on one is refused before loading instead of doing nothing.
    - `before` compile: the step changes what the up blocks compute, so it belongs before `compile` in the
      recipe, which lists steps in the order they change the model. (It also shows how a plugin orders
      itself against a built-in step without that step knowing about it.)
    - no `undo`: FreeU's factors live on this pipeline's UNet only, and the pipeline is dropped after the
      run; nothing process-wide changes.
    """

    name = "freeu"
    summary = "FreeU: re-weight UNet decoder backbone and skip features (diffusers' enable_freeu)"
    Params = FreeUParams
    applies_to = frozenset({ModelKind.UNET})
    before = frozenset({"compile"})

    def apply(self, pipe: Any, ctx: ApplyContext) -> str:
        p = self.params
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(unet, "enable_freeu"):
            raise RuntimeError(f"{type(pipe).__name__} has no UNet with FreeU support (unet.enable_freeu)")
        unet.enable_freeu(s1=p.s1, s2=p.s2, b1=p.b1, b2=p.b2)
        return f"s1 {p.s1}, s2 {p.s2}, b1 {p.b1}, b2 {p.b2}"

    def effect(self, pipe: Any) -> StepEffect | None:
        """Whether the UNet's up blocks still carry FreeU's factors once the images are made."""
        unet = getattr(pipe, "unet", None)
        blocks = list(getattr(unet, "up_blocks", None) or [])
        wanted = self.params.model_dump()
        with_freeu = sum(
            1 for block in blocks if all(getattr(block, a, None) == wanted[a] for a in FREEU_ATTRIBUTES)
        )
        counters = {"up_blocks": len(blocks), "up_blocks_with_freeu": with_freeu}
        summary = f"{with_freeu} of {len(blocks)} UNet up blocks carry FreeU's factors"
        if with_freeu == 0:
            return StepEffect(counters, summary, no_effect="no UNet up block carries FreeU's factors")
        return StepEffect(counters, summary)


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(FreeU)
