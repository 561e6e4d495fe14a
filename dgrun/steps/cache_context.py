"""diffusers' caches on transformers that diffusers has not wired for them (SD3 in diffusers 0.42).

diffusers' caches are hooks on a transformer's blocks that keep their state per *cache context*: the model
gets `enable_cache` / `cache_context` from `CacheMixin`, and its pipeline opens a context around every
denoiser call (`with transformer.cache_context("cond"): ...`). `SD3Transformer2DModel` has neither, and
`StableDiffusion3Pipeline` opens no context, although diffusers registers SD3's `JointTransformerBlock`
for the hooks. So a cache step would fail on it ("No cache context is set").

`add_cache_support` gives such a model the mixin (a subclass of its own class, so other instances stay as
they are) and opens one context per forward call. That is what diffusers' own pipelines do for a model
whose guidance is batched into one call, as SD3's is. It also keeps the call's timestep, for the caches
that ask where the loop is when the pipeline has no `current_timestep` (SD3 has none).
"""

from __future__ import annotations

from typing import Any

# SD3 batches [unconditional, conditional] into one transformer call: one context holds both halves.
CONTEXT_NAME = "cond_uncond"


def needs_cache_support(module: Any) -> bool:
    """Whether the model lacks diffusers' cache API (`enable_cache`)."""
    return not hasattr(module, "enable_cache")


def add_cache_support(module: Any) -> None:
    """Give `module` diffusers' `CacheMixin` and a cache context around each of its calls.

    Whether a given cache then finds what it hooks (registered blocks, attention modules) is the cache's
    own check, with diffusers' own message.
    """
    from diffusers.models.cache_utils import CacheMixin

    cls = type(module)
    namespace = {"__module__": cls.__module__, "__doc__": cls.__doc__}
    module.__class__ = type(cls.__name__, (cls, CacheMixin), namespace)
    module._dgrun_last_timestep = None
    module._dgrun_open_context = None
    import torch

    # Kept out of torch.compile's graphs: reading the timestep as a Python float would break the graph.
    module.register_forward_pre_hook(torch.compiler.disable(_open_context), with_kwargs=True)
    module.register_forward_hook(torch.compiler.disable(_close_context), always_call=True)


def last_timestep(module: Any) -> float | None:
    """The timestep of the model's latest call (None before the first one or without `add_cache_support`)."""
    return getattr(module, "_dgrun_last_timestep", None)


def timestep_callback(pipe: Any, module: Any, step: str) -> Any:
    """Where the denoising loop is: `pipe.current_timestep`, else the timestep of the model's last call."""
    if hasattr(type(pipe), "current_timestep"):
        return lambda: pipe.current_timestep
    if hasattr(module, "_dgrun_last_timestep"):
        return lambda: last_timestep(module)
    raise RuntimeError(
        f"{type(pipe).__name__} does not expose `current_timestep`, which {step} needs to know where "
        "the denoising loop is"
    )


def _open_context(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    timestep = kwargs.get("timestep")
    if timestep is not None:
        # One value per call: every sample of a batched call is at the same point of the schedule.
        flat = timestep.flatten()[0] if hasattr(timestep, "flatten") else timestep
        module._dgrun_last_timestep = float(flat)
    context = module.cache_context(CONTEXT_NAME)
    context.__enter__()
    module._dgrun_open_context = context


def _close_context(module: Any, args: tuple[Any, ...], output: Any) -> None:
    context, module._dgrun_open_context = module._dgrun_open_context, None
    if context is not None:
        context.__exit__(None, None, None)
