"""dgrun plugin: the `cache_dit` step, cache-dit's DBCache (dual block cache) on transformer pipelines.

cache-dit is imported only when the step is applied, so listing steps or checking recipes stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from dgrun import ApplyContext, ModelKind, Optimizer, StepEffect, StepParams, hookimpl
from dgrun.effects import SkipWatch
from dgrun.optimizer import TAG_CACHE, TAG_REWRITES_MODULES
from dgrun.steps.cache import transformer_blocks

__version__ = "0.1.0"


class CacheDitParams(StepParams):
    fn_compute_blocks: int = Field(
        8, ge=1, description="first n blocks always computed; their residual change decides cache hits"
    )
    bn_compute_blocks: int = Field(
        0, ge=0, description="last n blocks always computed (refine cached output)"
    )
    residual_diff_threshold: float = Field(
        0.08,
        gt=0,
        description="relative L1 change of the first blocks' residual below which the rest is reused",
    )
    max_warmup_steps: int = Field(8, ge=0, description="never cache during the first n steps")
    warmup_interval: int = Field(1, ge=1, description="during warmup, compute every n-th step only")
    max_cached_steps: int = Field(-1, ge=-1, description="most cached steps per call; -1: no limit")
    max_continuous_cached_steps: int = Field(
        -1, ge=-1, description="most cached steps in a row; -1: no limit"
    )
    enable_separate_cfg: bool | None = Field(
        None,
        description="CFG runs as a separate transformer call; null: cache-dit's default for the pipeline",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, description="lets cache-dit refresh after this many steps"
    )
    taylorseer_order: int | None = Field(
        None,
        ge=1,
        le=4,
        description="forecast cached states with TaylorSeer of this order; null: plain reuse",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> CacheDitParams:
        steps = self.num_inference_steps
        if steps is not None and self.max_warmup_steps >= steps:
            raise ValueError(
                f"max_warmup_steps ({self.max_warmup_steps}) >= num_inference_steps ({steps}): "
                "nothing would be cached"
            )
        return self


def _quiet_cache_dit() -> None:
    """cache-dit logs every adapter decision to stdout at INFO; dgrun's users only need its warnings."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read once, when cache_dit is first imported
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("cache_dit") and isinstance(logger, logging.Logger):
            logger.setLevel(max(logger.level, logging.WARNING))


def block_count(transformer: Any) -> int:
    """Transformer blocks cache-dit can split into Fn / middle / Bn (all `*blocks` ModuleLists together)."""
    return len(transformer_blocks(transformer))


class CacheDit(Optimizer[CacheDitParams]):
    """DBCache: compute the first Fn (and last Bn) blocks each step, reuse the middle ones while stable.

    cache-dit wraps `__call__` on the pipeline's class; the step gives the pipeline a class of its own first,
    so other pipelines of the same class in this process (a benchmark's baseline) stay uncached.
    """

    name = "cache_dit"
    summary = "cache-dit DBCache: reuse middle transformer blocks between steps (the cache-dit package)"
    Params = CacheDitParams
    tags = frozenset({TAG_CACHE, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_CACHE})
    after = frozenset({"fuse_qkv"})
    applies_to = frozenset({ModelKind.TRANSFORMER})
    requires_packages = ("cache_dit",)

    def __init__(self, params: CacheDitParams):
        super().__init__(params)
        self.pipe: Any = None
        self.watch: SkipWatch | None = None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str:
        _quiet_cache_dit()
        import cache_dit

        _quiet_cache_dit()
        p = self.params
        if not cache_dit.BlockAdapterRegister.is_supported(pipe):
            count, names = cache_dit.supported_pipelines()
            raise RuntimeError(
                f"cache-dit has no block adapter for {type(pipe).__name__}; it supports {count} pipeline "
                f"families: {', '.join(names)}"
            )
        blocks = block_count(pipe.transformer)
        if p.fn_compute_blocks + p.bn_compute_blocks > blocks:
            raise ValueError(
                f"fn_compute_blocks + bn_compute_blocks = {p.fn_compute_blocks + p.bn_compute_blocks} but "
                f"{type(pipe.transformer).__name__} has {blocks} blocks"
            )
        cache_config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=p.fn_compute_blocks,
            Bn_compute_blocks=p.bn_compute_blocks,
            residual_diff_threshold=p.residual_diff_threshold,
            max_warmup_steps=p.max_warmup_steps,
            warmup_interval=p.warmup_interval,
            max_cached_steps=p.max_cached_steps,
            max_continuous_cached_steps=p.max_continuous_cached_steps,
            enable_separate_cfg=p.enable_separate_cfg,
            num_inference_steps=p.num_inference_steps,
        )
        calibrator = None
        if p.taylorseer_order is not None:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=p.taylorseer_order)
        cls = type(pipe)
        pipe.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        cache_dit.enable_cache(pipe, cache_config=cache_config, calibrator_config=calibrator)
        _quiet_cache_dit()  # loggers of modules cache-dit imported just now
        self.pipe = pipe
        # On a cache hit DBCache reuses the residual of every block after the first Fn: the last one
        # (unless the last Bn blocks are always computed) runs only on full steps.
        watched = transformer_blocks(pipe.transformer)[-1 - p.bn_compute_blocks]
        self.watch = SkipWatch(pipe.transformer, watched, f"block -{p.bn_compute_blocks + 1}")
        detail = f"F{p.fn_compute_blocks}B{p.bn_compute_blocks} of {blocks} blocks, threshold "
        detail += f"{p.residual_diff_threshold}, warmup {p.max_warmup_steps}"
        if p.taylorseer_order is not None:
            detail += f", TaylorSeer order {p.taylorseer_order}"
        return detail

    def effect(self, pipe: Any) -> StepEffect | None:
        watch, self.watch = self.watch, None
        return watch.effect() if watch is not None else None

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """Release cache-dit's hooks when the first call failed inside cache-dit."""
        if self.pipe is None or not _raised_in_cache_dit(error):
            return None
        import cache_dit

        cache_dit.disable_cache(self.pipe)
        self.pipe = None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"disabled: cache-dit failed on the first call ({type(error).__name__}: {first_line[:200]})"


def _raised_in_cache_dit(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if f"{os.sep}cache_dit{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(CacheDit)
