"""dgrun's own plugin: the built-in steps and `dgrun:` models, registered through the entry-point group
like any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dgrun.hookspecs import hookimpl
from dgrun.models import BUILTIN_PREFIX, load_builtin
from dgrun.steps import BUILTIN_OPTIMIZERS


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    for optimizer in BUILTIN_OPTIMIZERS:
        register(optimizer)


@hookimpl
def dgrun_load_pipeline(model: Any, device: str, dtype: Any) -> Any:
    if not model.id.startswith(BUILTIN_PREFIX):
        return None
    return load_builtin(model.id, device, dtype)
