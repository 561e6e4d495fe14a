"""MagCache: skip whole denoiser steps by calibrated residual magnitude ratios (diffusers' MagCacheConfig).

Shares the rules and recovery of the other diffusers caches (`DiffusersCache` in cache.py); its own part
is where the ratios come from (given, FLUX.1's, or calibrated here with one call) and resampling them to
each call's number of steps.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import ApplyContext, StepParams
from dgrun.steps.cache import DiffusersCache


class MagCacheParams(StepParams):
    threshold: float = Field(0.06, gt=0, description="accumulated error below which a step is skipped")
    max_skip_steps: int = Field(3, ge=1, description="most consecutive skipped steps")
    retention_ratio: float = Field(0.2, ge=0, le=1, description="fraction of initial steps never skipped")
    num_inference_steps: int | None = Field(
        None, ge=1, description="null: each pipeline call's own number of steps (ratios interpolated to it)"
    )
    mag_ratios: Annotated[list[float], Field(min_length=2)] | Literal["flux"] | None = Field(
        None,
        description="per-step residual magnitude ratios of this checkpoint; 'flux': diffusers' FLUX.1 ratios",
    )
    calibrate: bool = Field(False, description="measure mag_ratios with one pipeline call before the run")
    calibration_prompt: str = Field("a photo", min_length=1)

    @model_validator(mode="after")
    def _ratios_or_calibration(self) -> MagCacheParams:
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError(
                "MagCache needs mag_ratios calibrated for the checkpoint: give mag_ratios (a list, or 'flux' "
                "for FLUX.1 dev/schnell) or calibrate: true (one extra uncached pipeline call)"
            )
        if self.mag_ratios is not None and self.calibrate:
            raise ValueError("give either mag_ratios or calibrate: true, not both")
        if isinstance(self.mag_ratios, list) and any(r <= 0 for r in self.mag_ratios):
            raise ValueError("mag_ratios are magnitude ratios and must be positive")
        return self


class MagCache(DiffusersCache[MagCacheParams]):
    """Skip steps while the residual's magnitude ratio, accumulated from calibrated ratios, stays near 1.

    The ratios depend on the checkpoint and schedule, so they are given or calibrated (never guessed), and
    resampled to each call's number of steps, which the step reads from the pipeline before each call.
    """

    name = "mag_cache"
    summary = "diffusers MagCache: skip steps by calibrated residual magnitude ratios"
    Params = MagCacheParams
    hook_module = "mag_cache"
    calibration_steps: ClassVar[int] = 28  # diffusers' default num_inference_steps

    def __init__(self, params: MagCacheParams):
        super().__init__(params)
        self.ratios: list[float] = []
        self.source = ""
        self.config: Any = None
        self.sync_handle: Any = None

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        p = self.params
        if p.calibrate:
            steps = p.num_inference_steps or self.calibration_steps
            self.ratios = self.calibrate(pipe, module, ctx, steps)
            self.source = f"calibrated on {steps} steps: mag_ratios {[round(r, 4) for r in self.ratios]}"
        elif p.mag_ratios == "flux":
            self.ratios = [float(r) for r in FLUX_MAG_RATIOS]
            self.source = f"mag_ratios flux ({len(self.ratios)} values)"
        else:
            self.ratios = list(p.mag_ratios)
            self.source = f"mag_ratios given ({len(self.ratios)} values)"
        self.config = MagCacheConfig(
            threshold=p.threshold,
            max_skip_steps=p.max_skip_steps,
            retention_ratio=p.retention_ratio,
            num_inference_steps=p.num_inference_steps or len(self.ratios),
            mag_ratios=list(self.ratios),
        )
        if p.num_inference_steps is None:
            self.sync_handle = module.register_forward_pre_hook(self._sync_steps(pipe))
        return self.config

    def _sync_steps(self, pipe: Any) -> Any:
        """A pre-hook that resamples the ratios when a call runs a different number of steps.

        Pipelines set `_num_timesteps` before their denoising loop; kept out of torch.compile's graphs.
        """
        import torch
        from diffusers.hooks.mag_cache import nearest_interp

        @torch.compiler.disable
        def sync(_module: Any, _args: Any) -> None:
            steps = getattr(pipe, "_num_timesteps", None)
            if isinstance(steps, int) and steps > 0 and steps != self.config.num_inference_steps:
                self.config.num_inference_steps = steps
                self.config.mag_ratios = nearest_interp(torch.tensor(self.ratios), steps)

        return sync

    def calibrate(self, pipe: Any, module: Any, ctx: ApplyContext, steps: int) -> list[float]:
        """One uncached call in diffusers' calibration mode; diffusers prints the ratios, we read them."""
        import torch
        from diffusers.hooks import MagCacheConfig

        module.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        printed = io.StringIO()
        kwargs: dict[str, Any] = (
            {"width": ctx.width, "height": ctx.height} if ctx.width and ctx.height else {}
        )
        try:
            with torch.inference_mode(), contextlib.redirect_stdout(printed):
                pipe(
                    prompt=self.params.calibration_prompt,
                    num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent",
                    **kwargs,
                )
        finally:
            module.disable_cache()
        lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
        try:
            ratios = [float(r) for r in ast.literal_eval(lists[-1])]
        except (IndexError, ValueError, SyntaxError, TypeError):
            raise RuntimeError(
                "MagCache calibration printed no ratios (diffusers' calibration output may have changed); "
                "give mag_ratios instead"
            ) from None
        if len(ratios) != steps:
            raise RuntimeError(f"MagCache calibration measured {len(ratios)} ratios for {steps} steps")
        return ratios

    def describe(self) -> str:
        p = self.params
        steps = p.num_inference_steps or "each call's"
        return f"threshold {p.threshold}, {self.source}, resampled to {steps} steps"

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        message = super().recover(pipe, error)
        if message is not None and self.sync_handle is not None:
            self.sync_handle.remove()
            self.sync_handle = None
        return message


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(MagCache)
