"""dgrun: diffusion-inference optimization as version-controlled, reproducible experiments.

Importing this package must stay cheap (`dgrun --help` ≤ 0.3 s): the plugin API below is loaded on first
use, and torch and diffusers only where they are needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "dgrun.hookspecs",
    "DgrunError": "dgrun.errors",
    "PluginError": "dgrun.errors",
    "RecipeError": "dgrun.errors",
    "RunError": "dgrun.errors",
    "UsageError": "dgrun.errors",
    "ApplyContext": "dgrun.optimizer",
    "Environment": "dgrun.optimizer",
    "ModelKind": "dgrun.optimizer",
    "NoParams": "dgrun.optimizer",
    "Optimizer": "dgrun.optimizer",
    "PlanView": "dgrun.optimizer",
    "Stage": "dgrun.optimizer",
    "StepEffect": "dgrun.optimizer",
    "StepParams": "dgrun.optimizer",
    "StepResult": "dgrun.optimizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dgrun' has no attribute {name!r}")
