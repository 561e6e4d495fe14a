"""dgrun plugin: the `deepcache` step, wrapping the DeepCache package's `DeepCacheSDHelper`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from dgrun import ApplyContext, ModelKind, Optimizer, StepEffect, StepParams, hookimpl
from dgrun.effects import SkipWatch
from dgrun.optimizer import TAG_CACHE, TAG_PER_STEP_PYTHON, TAG_REWRITES_MODULES

__version__ = "0.1.0"


class DeepCacheParams(StepParams):
    interval: int = Field(
        3, ge=1, description="full UNet pass every `interval` steps; cached deep features between"
    )
    branch_id: int = Field(0, ge=0, description="skip branch whose features are cached (0 = shallowest)")


class DeepCache(Optimizer[DeepCacheParams]):
    """Reuse the UNet's deep (low-resolution) features across steps; only the shallow branch runs."""

    name = "deepcache"
    summary = "DeepCache: reuse deep UNet features between full steps (the DeepCache package)"
    Params = DeepCacheParams
    tags = frozenset({TAG_CACHE, TAG_REWRITES_MODULES, TAG_PER_STEP_PYTHON})
    conflicts = frozenset({"#" + TAG_CACHE})
    after = frozenset({"fuse_qkv"})
    applies_to = frozenset({ModelKind.UNET})
    requires_packages = ("DeepCache",)

    def __init__(self, params: DeepCacheParams):
        super().__init__(params)
        self.helper: Any = None
        self.watch: SkipWatch | None = None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        from DeepCache import DeepCacheSDHelper

        blocks = len(pipe.unet.down_blocks)
        if self.params.branch_id // 3 >= blocks:
            raise ValueError(
                f"branch_id {self.params.branch_id} is out of range: this UNet has {blocks} down blocks "
                f"(branch_id < {3 * blocks})"
            )
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=self.params.interval, cache_branch_id=self.params.branch_id)
        self.helper.enable()
        # On a cached step DeepCache reuses the deep features: the mid block does not run.
        self.watch = SkipWatch(pipe.unet, pipe.unet.mid_block, "unet.mid_block")
        return f"interval {self.params.interval}, branch {self.params.branch_id}"

    def effect(self, pipe: Any) -> StepEffect | None:
        return self.watch.effect() if self.watch is not None else None


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(DeepCache)
