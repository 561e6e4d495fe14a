"""Step caches built into diffusers' hook system (transformer pipelines only).

Each step builds one diffusers config (`FirstBlockCacheConfig`, `PyramidAttentionBroadcastConfig`,
`FasterCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`) from JSON-able params and calls the
denoiser's `enable_cache`. Callbacks diffusers wants (the current timestep, weights) are wired here, so a
recipe never needs code. diffusers gives a UNet silent no-ops or errors for these, hence `applies_to`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dgrun.effects import SkipWatch
from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_CACHE,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ModelKind,
    Optimizer,
    P,
    StepEffect,
    StepParams,
)
from dgrun.steps.cache_context import add_cache_support, needs_cache_support, timestep_callback
from dgrun.steps.denoiser import denoiser_name

TimestepRange = Annotated[list[int], Field(min_length=2, max_length=2)]
Patterns = Annotated[list[str], Field(min_length=1)]


def _check_range(value: list[int] | None) -> list[int] | None:
    if value is not None and value[0] >= value[1]:
        raise ValueError(f"a timestep range is [low, high] with low < high, got {value}")
    return value


def _check_patterns(value: list[str] | None) -> list[str] | None:
    for pattern in value or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return value


def _raised_in(error: BaseException, hook_module: str) -> bool:
    """Whether the traceback passes through `diffusers/hooks/<hook_module>.py`."""
    tb = error.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if path.stem == hook_module and path.parent.name == "hooks":
            return True
        tb = tb.tb_next
    return False


class DiffusersCache(Optimizer[P]):
    """Shared shape of the diffusers caches: rules, `enable_cache` on the denoiser, recovery.

    If the first pipeline call fails inside this cache's diffusers hooks (e.g. a model layout diffusers'
    cache does not handle), `recover` disables the cache so the run goes on uncached, and says so.
    """

    tags = frozenset({TAG_CACHE, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_CACHE})
    after = frozenset({"fuse_qkv"})
    applies_to = frozenset({ModelKind.TRANSFORMER})
    hook_module: ClassVar[str]  # the diffusers.hooks module whose frames identify this cache's failures
    # What the cache saves work on, for the effect counters: whole blocks (the last one is watched) or
    # attention (the first block's attention is watched).
    skips: ClassVar[str] = "blocks"

    def __init__(self, params: StepParams):
        super().__init__(params)
        self.module: Any = None
        self.watch: SkipWatch | None = None

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        """The diffusers config object for this step."""
        raise NotImplementedError

    def describe(self) -> str | None:
        """The detail recorded for an applied step."""
        return None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        module = getattr(pipe, denoiser_name(pipe))
        adapted = needs_cache_support(module)
        if adapted:  # e.g. SD3: diffusers registers its blocks but gives the model no cache API
            add_cache_support(module)
        module.enable_cache(self.build_config(pipe, module, ctx))
        self.module = module
        self.watch = _skip_watch(module, self.skips)
        detail = self.describe()
        if adapted:
            note = f"cache context opened per {type(module).__name__} call by dgrun"
            detail = f"{detail}; {note}" if detail else note
        return detail

    def effect(self, pipe: Any) -> StepEffect | None:
        if self.watch is None:
            return None
        watch, self.watch = self.watch, None
        return watch.effect()

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        if self.module is None or not _raised_in(error, self.hook_module):
            return None
        self.module.disable_cache()
        self.module = None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"disabled: the cache failed on the first call ({type(error).__name__}: {first_line[:200]})"


def transformer_blocks(module: Any) -> list[Any]:
    """The transformer's blocks in order (every `*blocks` ModuleList: FLUX has two kinds)."""
    import torch

    return [
        block
        for name, child in module.named_children()
        if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]


def _skip_watch(module: Any, skips: str) -> SkipWatch | None:
    blocks = transformer_blocks(module)
    if not blocks:
        return None
    if skips == "attention":
        attention = getattr(blocks[0], "attn", None)
        if attention is not None:
            return SkipWatch(module, attention, "first block's attention")
    return SkipWatch(module, blocks[-1], "last block")


# ------------------------------------------------------------------------------------ first block cache
class FirstBlockCacheParams(StepParams):
    threshold: float = Field(
        0.2,
        gt=0,
        description="relative change of the first block's output below which "
        "the remaining blocks are skipped and their cached residual reused",
    )


class FirstBlockCache(DiffusersCache[FirstBlockCacheParams]):
    """Skip the transformer's later blocks on steps where its first block's output barely changed."""

    name = "first_block_cache"
    summary = "diffusers FirstBlockCache: reuse later blocks when the first block barely changes"
    Params = FirstBlockCacheParams
    hook_module = "first_block_cache"

    @classmethod
    def pipeline_problem(cls, pipeline_class: str) -> str | None:
        if pipeline_class.startswith("StableDiffusion3"):
            return (
                "diffusers' FirstBlockCache cannot handle SD3Transformer2DModel, whose last block "
                "(context_pre_only) returns no encoder states; mag_cache (which also skips whole steps) "
                "and taylor_seer run on it"
            )
        return None

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        blocks = transformer_blocks(module)
        if blocks and getattr(blocks[-1], "context_pre_only", False):
            # diffusers 0.42 subtracts the last block's encoder output, which such a block returns as None.
            raise RuntimeError(
                f"diffusers' FirstBlockCache cannot handle {type(module).__name__}: its last block "
                f"({type(blocks[-1]).__name__}, context_pre_only) returns no encoder states; "
                "mag_cache (which also skips whole steps) and taylor_seer run on it"
            )
        return FirstBlockCacheConfig(threshold=self.params.threshold)

    def describe(self) -> str:
        return f"threshold {self.params.threshold}"


# ---------------------------------------------------------------------------- pyramid attention broadcast
class PabParams(StepParams):
    spatial_attention_block_skip_range: int | None = Field(
        2, ge=1, description="compute spatial self-attention every N steps, reuse it in between"
    )
    temporal_attention_block_skip_range: int | None = Field(None, ge=1, description="video models")
    cross_attention_block_skip_range: int | None = Field(None, ge=1)
    spatial_attention_timestep_skip_range: TimestepRange = Field(
        [100, 800], description="skip only while the timestep lies strictly inside [low, high]"
    )
    temporal_attention_timestep_skip_range: TimestepRange = Field([100, 800])
    cross_attention_timestep_skip_range: TimestepRange = Field([100, 800])
    spatial_attention_block_identifiers: Patterns | None = Field(None, description="default: diffusers'")
    temporal_attention_block_identifiers: Patterns | None = None
    cross_attention_block_identifiers: Patterns | None = None

    check_ranges = field_validator(
        "spatial_attention_timestep_skip_range",
        "temporal_attention_timestep_skip_range",
        "cross_attention_timestep_skip_range",
    )(_check_range)
    check_patterns = field_validator(
        "spatial_attention_block_identifiers",
        "temporal_attention_block_identifiers",
        "cross_attention_block_identifiers",
    )(_check_patterns)

    @model_validator(mode="after")
    def _something_to_skip(self) -> PabParams:
        kinds = ("spatial", "temporal", "cross")
        if all(getattr(self, f"{kind}_attention_block_skip_range") is None for kind in kinds):
            raise ValueError(
                "set at least one of spatial_attention_block_skip_range, "
                "temporal_attention_block_skip_range, cross_attention_block_skip_range"
            )
        return self


class PyramidAttentionBroadcast(DiffusersCache[PabParams]):
    """Reuse attention outputs across neighbouring steps in the middle of the schedule (PAB)."""

    name = "pab"
    skips = "attention"
    summary = "diffusers Pyramid Attention Broadcast: reuse attention outputs between steps"
    Params = PabParams
    hook_module = "pyramid_attention_broadcast"

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        values = self.params.model_dump(exclude_none=True)
        for key in [k for k in values if k.endswith("_range") and "timestep" in k]:
            values[key] = tuple(values[key])
        for key in [k for k in values if k.endswith("_identifiers")]:
            values[key] = tuple(values[key])
        return PyramidAttentionBroadcastConfig(
            **values, current_timestep_callback=timestep_callback(pipe, module, "pab")
        )

    def describe(self) -> str:
        parts = []
        for kind in ("spatial", "temporal", "cross"):
            every = getattr(self.params, f"{kind}_attention_block_skip_range")
            if every is not None:
                low, high = getattr(self.params, f"{kind}_attention_timestep_skip_range")
                parts.append(f"{kind} attention every {every} steps for timesteps in ({low}, {high})")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------ faster cache
class FasterCacheParams(StepParams):
    spatial_attention_block_skip_range: int = Field(2, ge=1)
    temporal_attention_block_skip_range: int | None = Field(None, ge=1)
    spatial_attention_timestep_skip_range: TimestepRange = Field([-1, 681])
    temporal_attention_timestep_skip_range: TimestepRange = Field([-1, 681])
    low_frequency_weight_update_timestep_range: TimestepRange = Field([99, 901])
    high_frequency_weight_update_timestep_range: TimestepRange = Field([-1, 301])
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = Field(
        5, ge=1, description="compute the unconditional (CFG) branch every N steps, approximate it in between"
    )
    unconditional_batch_timestep_skip_range: TimestepRange = Field([-1, 641])
    spatial_attention_block_identifiers: Patterns | None = None
    temporal_attention_block_identifiers: Patterns | None = None
    attention_weight: float = Field(
        0.5,
        description="weight of the extrapolation from the last two attention outputs (diffusers' default)",
    )
    tensor_format: Literal["BCFHW", "BFCHW", "BCHW"] = Field(
        "BCHW",
        description="layout of the denoiser output; BCHW for image models (diffusers' default is video)",
    )
    is_guidance_distilled: bool | None = Field(
        None,
        description="null: true for pipelines without batched classifier-free guidance (FLUX); "
        "set it for pipelines that run CFG as separate calls",
    )

    check_ranges = field_validator(
        "spatial_attention_timestep_skip_range",
        "temporal_attention_timestep_skip_range",
        "low_frequency_weight_update_timestep_range",
        "high_frequency_weight_update_timestep_range",
        "unconditional_batch_timestep_skip_range",
    )(_check_range)
    check_patterns = field_validator(
        "spatial_attention_block_identifiers", "temporal_attention_block_identifiers"
    )(_check_patterns)


class FasterCache(DiffusersCache[FasterCacheParams]):
    """Reuse attention outputs between steps and approximate the CFG branch from the conditional one."""

    name = "faster_cache"
    skips = "attention"
    summary = "diffusers FasterCache: reuse attention and approximate the unconditional branch"
    Params = FasterCacheParams
    hook_module = "faster_cache"

    def __init__(self, params: FasterCacheParams):
        super().__init__(params)
        self.distilled = False

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        from diffusers.hooks import FasterCacheConfig

        params = self.params
        # Pipelines that batch [uncond, cond] declare `do_classifier_free_guidance`; FLUX has no such batch.
        distilled = params.is_guidance_distilled
        if distilled is None:
            distilled = not hasattr(type(pipe), "do_classifier_free_guidance")
        self.distilled = distilled
        values = params.model_dump(exclude={"attention_weight", "is_guidance_distilled"}, exclude_none=True)
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(value)
        weight = params.attention_weight
        # Inputs holding [uncond, cond] batches, which FasterCache splits: diffusers' list misses SD3's
        # pooled text embedding, batched like the rest.
        batched = list(FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers)
        if "pooled_projections" in inspect.signature(module.forward).parameters:
            batched.append("pooled_projections")
        return FasterCacheConfig(
            **values,
            attention_weight_callback=lambda _module: weight,
            is_guidance_distilled=distilled,
            current_timestep_callback=timestep_callback(pipe, module, "faster_cache"),
            _unconditional_conditional_input_kwargs_identifiers=batched,
        )

    def describe(self) -> str:
        low, high = self.params.spatial_attention_timestep_skip_range
        detail = (
            f"spatial attention every {self.params.spatial_attention_block_skip_range} steps "
            f"for timesteps in ({low}, {high})"
        )
        if self.distilled:
            return detail + "; guidance-distilled: no unconditional branch to skip"
        return detail + f"; unconditional branch every {self.params.unconditional_batch_skip_range} steps"


# ----------------------------------------------------------------------------------------- TaylorSeer
class TaylorSeerParams(StepParams):
    cache_interval: int = Field(5, ge=1, description="a full computation every N steps, predicted in between")
    disable_cache_before_step: int = Field(3, ge=0, description="full computation for the first N steps")
    disable_cache_after_step: int | None = Field(None, ge=0, description="full computation from step N on")
    max_order: int = Field(1, ge=0, le=4, description="order of the Taylor expansion")
    taylor_factors_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    skip_predict_identifiers: Patterns | None = Field(
        None, description="modules (re.fullmatch) that return zeros on predicted steps"
    )
    cache_identifiers: Patterns | None = Field(
        None, description="modules (re.fullmatch) whose outputs are predicted; default: every attention"
    )
    use_lite_mode: bool = Field(False, description="predict only proj_out and skip whole blocks (fastest)")

    check_patterns = field_validator("skip_predict_identifiers", "cache_identifiers")(_check_patterns)

    @model_validator(mode="after")
    def _order(self) -> TaylorSeerParams:
        after = self.disable_cache_after_step
        if after is not None and after <= self.disable_cache_before_step:
            raise ValueError("disable_cache_after_step must be greater than disable_cache_before_step")
        return self


class TaylorSeer(DiffusersCache[TaylorSeerParams]):
    """Predict module outputs on skipped steps from a Taylor expansion of their recent history."""

    name = "taylor_seer"
    skips = "attention"
    summary = "diffusers TaylorSeer: predict skipped steps' features by Taylor extrapolation"
    Params = TaylorSeerParams
    hook_module = "taylorseer_cache"

    def build_config(self, pipe: Any, module: Any, ctx: ApplyContext) -> Any:
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig

        values = self.params.model_dump()
        values["taylor_factors_dtype"] = getattr(torch, values["taylor_factors_dtype"])
        return TaylorSeerCacheConfig(**values)

    def describe(self) -> str:
        p = self.params
        mode = (
            "lite (blocks skipped, proj_out predicted)" if p.use_lite_mode else "attention outputs predicted"
        )
        return (
            f"full step every {p.cache_interval} after the first {p.disable_cache_before_step}, "
            f"order {p.max_order}, {mode}"
        )


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(FirstBlockCache)
    register(PyramidAttentionBroadcast)
    register(FasterCache)
    register(TaylorSeer)
