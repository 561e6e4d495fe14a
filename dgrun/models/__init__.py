"""Built-in `dgrun:` models and model-kind detection that works without importing torch.

`dgrun check` must know whether a recipe's model is a UNet or a transformer pipeline before anything is
loaded: for built-in models the catalogue below says so, for local directories `model_index.json` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgrun.optimizer import ModelKind

BUILTIN_PREFIX = "dgrun:"


@dataclass(frozen=True)
class BuiltinModel:
    """A pipeline dgrun builds or ships itself, so recipes and tests run without a model hub."""

    name: str
    kind: ModelKind
    builder: str
    pipeline_class: str
    native_size: int
    description: str
    modules: tuple[str, ...]  # its torch-module components, for the planner's `components` check


UNET_MODULES = ("unet", "vae", "text_encoder")
TRANSFORMER_MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")
# model_index.json entries that are not torch modules.
_NOT_MODULES = ("tokenizer", "scheduler", "feature_extractor", "image_processor")

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            "tiny-sd",
            ModelKind.UNET,
            "dgrun.models.tiny:build_tiny_sd",
            "StableDiffusionPipeline",
            32,
            "random-weight Stable Diffusion pipeline (UNet), built in code; for tests",
            UNET_MODULES,
        ),
        BuiltinModel(
            "tiny-flux",
            ModelKind.TRANSFORMER,
            "dgrun.models.tiny:build_tiny_flux",
            "FluxPipeline",
            32,
            "random-weight FLUX pipeline (transformer), built in code; for tests",
            TRANSFORMER_MODULES,
        ),
        BuiltinModel(
            "default",
            ModelKind.UNET,
            "dgrun.models.architecture:load_default",
            "StableDiffusionPipeline",
            64,
            "small text-to-image model (UNet) trained by the project, shipped in the package: "
            "'a red circle on a blue background'",
            UNET_MODULES,
        ),
        BuiltinModel(
            "default-dit",
            ModelKind.TRANSFORMER,
            "dgrun.models.architecture:load_default_dit",
            "StableDiffusion3Pipeline",
            64,
            "the same data on a small SD3 transformer pipeline (no T5), trained and shipped likewise",
            TRANSFORMER_MODULES,
        ),
    )
}


def builtin_model(model_id: str) -> BuiltinModel | None:
    """The built-in model a `dgrun:NAME` id names, or None for other ids."""
    if not model_id.startswith(BUILTIN_PREFIX):
        return None
    return BUILTIN_MODELS.get(model_id[len(BUILTIN_PREFIX) :])


def unknown_builtin_message(model_id: str) -> str:
    names = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in BUILTIN_MODELS)
    return f"unknown built-in model {model_id!r}; available: {names}"


def kind_from_components(components: dict[str, Any]) -> ModelKind | None:
    """UNet or transformer, from a pipeline's component names (model_index.json keys or pipe.components)."""
    if components.get("unet") is not None:
        return ModelKind.UNET
    if components.get("transformer") is not None:
        return ModelKind.TRANSFORMER
    return None


def static_model_info(model_id: str, base_dir: Path | None = None) -> tuple[ModelKind | None, str]:
    """Model kind and a label for messages, known without loading (None for hub ids)."""
    builtin = builtin_model(model_id)
    if builtin is not None:
        return builtin.kind, f"{model_id} ({builtin.pipeline_class})"
    if model_id.startswith(BUILTIN_PREFIX):
        return None, model_id
    components = _local_index(model_id, base_dir)
    if components is None:
        return None, model_id
    label = f"{model_id} ({components.get('_class_name', 'pipeline')})"
    return kind_from_components({k: v for k, v in components.items() if not k.startswith("_")}), label


def static_pipeline_class(model_id: str, base_dir: Path | None = None) -> str | None:
    """The pipeline class name, known without loading for built-in models and local directories."""
    builtin = builtin_model(model_id)
    if builtin is not None:
        return builtin.pipeline_class
    if model_id.startswith(BUILTIN_PREFIX):
        return None
    index = _local_index(model_id, base_dir)
    name = index.get("_class_name") if index else None
    return name if isinstance(name, str) and name.isidentifier() else None


def static_modules(model_id: str, base_dir: Path | None = None) -> tuple[str, ...] | None:
    """The torch-module components of a model, known without loading (built-in, local directory)."""
    builtin = builtin_model(model_id)
    if builtin is not None:
        return builtin.modules
    index = None if model_id.startswith(BUILTIN_PREFIX) else _local_index(model_id, base_dir)
    if index is None:
        return None
    return tuple(
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[:1] != [None]
        and not any(part in name for part in _NOT_MODULES)
    )


def local_model_problem(model_id: str, base_dir: Path | None = None) -> str | None:
    """Why `model.id`, written as a local path, cannot be loaded (known without loading), or None.

    An id that exists on disk must be a diffusers directory; one written as a path (`./`, `../`, `/`,
    `~`) must exist. Anything else may be a hub id, checked when it is loaded.
    """
    if model_id.startswith(BUILTIN_PREFIX):
        return None
    directory = Path(model_id).expanduser()
    if not directory.is_absolute() and base_dir is not None and not directory.exists():
        directory = base_dir / directory
    looks_local = model_id.startswith(("/", "./", "../", "~", ".\\", "..\\")) or model_id in (".", "..")
    if not directory.exists():
        return f"no such model directory: {directory}" if looks_local else None
    if not directory.is_dir() or not (directory / "model_index.json").is_file():
        return f"{directory} is not a diffusers model directory (it has no model_index.json)"
    return None


def _local_index(model_id: str, base_dir: Path | None) -> dict[str, Any] | None:
    """A local model directory's model_index.json (bounded read), or None."""
    from dgrun.safeio import read_bounded

    directory = Path(model_id).expanduser()
    if not directory.is_absolute() and base_dir is not None and not directory.exists():
        directory = base_dir / directory
    try:
        data = json.loads(read_bounded(directory / "model_index.json", 1 << 20, "model_index.json"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_builtin(model_id: str, device: str, dtype: Any) -> Any:
    """Build a built-in pipeline and move it to `device`/`dtype`."""
    import importlib

    builtin = builtin_model(model_id)
    if builtin is None:
        raise KeyError(unknown_builtin_message(model_id))
    module_name, function_name = builtin.builder.split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    pipe = builder(dtype=dtype)
    return pipe.to(device)


def resolve_dtype(name: str, device_kind: str) -> Any:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device_kind == "cuda" else torch.float32
    return getattr(torch, name)  # the recipe model allows only float32, float16 and bfloat16


def native_size(pipe: Any, model_id: str) -> tuple[int, int]:
    """The size a pipeline makes when width/height are not given."""
    builtin = builtin_model(model_id)
    if builtin is not None:
        return builtin.native_size, builtin.native_size
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", 64)
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    return int(sample) * scale, int(sample) * scale
