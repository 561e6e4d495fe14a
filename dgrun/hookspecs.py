"""The plugin hooks (entry-point group `dgrun`). Add a hook only when a real plugin needs one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("dgrun")
hookimpl = pluggy.HookimplMarker("dgrun")


@hookspec
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    """Call `register(OptimizerClass)` once for each optimizer this plugin provides.

    Each class subclasses `dgrun.Optimizer`; its `name` is the step name used in recipes.
    """


@hookspec(firstresult=True)
def dgrun_load_pipeline(model: Any, device: str, dtype: Any) -> Any:
    """Return a loaded pipeline if this plugin owns `model.id` (a `dgrun.recipe.ModelSpec`), else None.

    `device` is the resolved device string ("cpu", "cuda:0"), `dtype` the resolved `torch.dtype`.
    The pipeline is returned on the device, in the dtype.
    """
