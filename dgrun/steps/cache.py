"""Step caches built into diffusers' hook system (transformer pipelines)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dgrun.optimizer import TAG_CACHE, TAG_REWRITES_MODULES, ApplyContext, ModelKind, Optimizer, StepParams
from dgrun.steps.denoiser import denoiser_name


class FirstBlockCacheParams(StepParams):
    threshold: float = Field(
        0.2,
        gt=0,
        description="relative change of the first block's output below which "
        "the remaining blocks are skipped and their cached residual reused",
    )


class FirstBlockCache(Optimizer):
    """Skip the transformer's later blocks on steps where its first block's output barely changed."""

    name = "first_block_cache"
    summary = "diffusers FirstBlockCache: reuse later blocks when the first block barely changes"
    Params = FirstBlockCacheParams
    tags = frozenset({TAG_CACHE, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_CACHE})
    after = frozenset({"fuse_qkv"})
    applies_to = frozenset({ModelKind.TRANSFORMER})

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        from diffusers.hooks import FirstBlockCacheConfig

        module = getattr(pipe, denoiser_name(pipe))
        module.enable_cache(FirstBlockCacheConfig(threshold=self.params.threshold))
        return None


OPTIMIZERS: tuple[type[Optimizer], ...] = (FirstBlockCache,)
