"""dgrun's own plugin: the built-in steps and `dgrun:` models, registered through the entry-point group
like any third-party plugin. Each step module carries its own `@hookimpl`; this one calls them in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dgrun.hookspecs import hookimpl
from dgrun.models import BUILTIN_PREFIX, load_builtin
from dgrun.steps import (
    attention,
    cache,
    compile,
    mag_cache,
    offload,
    parallel,
    precision,
    quantize,
    runtime,
    vae,
)

STEP_MODULES = (runtime, offload, quantize, precision, vae, attention, cache, mag_cache, parallel, compile)


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    for module in STEP_MODULES:
        module.dgrun_register_optimizers(register)


@hookimpl
def dgrun_load_pipeline(model: Any, device: str, dtype: Any) -> Any:
    if not model.id.startswith(BUILTIN_PREFIX):
        return None
    return load_builtin(model.id, device, dtype)
