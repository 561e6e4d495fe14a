"""Finding the denoiser (UNet or transformer) of a pipeline, shared by the module-rewriting steps."""

from __future__ import annotations

from typing import Any


def denoiser_name(pipe: Any) -> str:
    """The component that runs every step: `transformer` or `unet`."""
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise RuntimeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` component")


def components(pipe: Any, names: list[str] | None) -> list[tuple[str, Any]]:
    """The named pipeline components (default: the denoiser), with a clear error for a wrong name."""
    wanted = names if names else [denoiser_name(pipe)]
    found = []
    for name in wanted:
        module = getattr(pipe, name, None)
        if module is None:
            available = ", ".join(
                k for k, v in getattr(pipe, "components", {}).items() if hasattr(v, "parameters")
            )
            raise RuntimeError(f"{type(pipe).__name__} has no component {name!r} (it has: {available})")
        found.append((name, module))
    return found
