"""dgrun's built-in optimization steps, one module per family. Importing them must not import torch.

Each module lists its optimizers in `OPTIMIZERS`; the built-in plugin registers them in this order.
"""

from __future__ import annotations

from dgrun.optimizer import Optimizer
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

BUILTIN_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    *runtime.OPTIMIZERS,
    *offload.OPTIMIZERS,
    *quantize.OPTIMIZERS,
    *precision.OPTIMIZERS,
    *vae.OPTIMIZERS,
    *attention.OPTIMIZERS,
    *cache.OPTIMIZERS,
    *mag_cache.OPTIMIZERS,
    *parallel.OPTIMIZERS,
    *compile.OPTIMIZERS,
)
