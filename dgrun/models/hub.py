"""Loading diffusers repo ids and local directories with the ordinary diffusers code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dgrun.errors import ModelLoadError
from dgrun.models import BUILTIN_MODELS, BUILTIN_PREFIX


def load_diffusers_pipeline(
    model: Any, device: str, dtype: Any, trust_remote_code: bool, extra: dict[str, Any], base_dir: Path
) -> Any:
    """`DiffusionPipeline.from_pretrained` (or the named pipeline class), with errors a user can act on."""
    import diffusers

    if model.pipeline == "auto":
        pipeline_class = diffusers.DiffusionPipeline
    else:
        pipeline_class = getattr(diffusers, model.pipeline, None)
        if not isinstance(pipeline_class, type) or not hasattr(pipeline_class, "from_pretrained"):
            raise ModelLoadError(f"model.pipeline: diffusers has no pipeline class {model.pipeline!r}")
    location = Path(model.id).expanduser()
    if not location.is_absolute() and not location.exists() and (base_dir / location).exists():
        location = base_dir / location
    source = str(location) if location.exists() else model.id
    if location.exists() and not (location / "model_index.json").is_file():
        raise ModelLoadError(f"model.id: {location} is a local path without a model_index.json")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if location.exists():
        kwargs.update(absent_components(location))
    kwargs.update(extra)
    if model.revision:
        kwargs["revision"] = model.revision
    if model.variant:
        kwargs["variant"] = model.variant
    try:
        pipe = pipeline_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        builtins = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_MODELS)
        raise ModelLoadError(
            f"cannot load {model.id!r}: it is not a local diffusers directory and the model hub could not "
            f"provide it ({first}). Offline, use a local directory or a built-in model ({builtins})."
        ) from exc
    return pipe.to(device)


def absent_components(directory: Path) -> dict[str, None]:
    """Optional components a saved pipeline lists as `[null, null]` (e.g. SD3 without T5), passed as None.

    `save_pretrained` records a component that was None that way, but `from_pretrained` still asks for it
    unless it is given explicitly.
    """
    try:
        index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value == [None, None]
    }
