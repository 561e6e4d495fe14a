"""dgrun's built-in optimization steps, one module per family. Importing them must not import torch."""

from __future__ import annotations

from dgrun.optimizer import Optimizer
from dgrun.steps.attention import AttentionBackend, FuseQkv
from dgrun.steps.cache import FirstBlockCache
from dgrun.steps.compile import Compile
from dgrun.steps.runtime import TF32
from dgrun.steps.vae import VaeSlicing, VaeTiling

BUILTIN_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    TF32,
    VaeSlicing,
    VaeTiling,
    AttentionBackend,
    FuseQkv,
    FirstBlockCache,
    Compile,
)
