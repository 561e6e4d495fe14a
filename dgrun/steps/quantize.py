"""Weight quantization of pipeline components (torchao, optimum-quanto, ...)."""

from __future__ import annotations

from dgrun.optimizer import Optimizer

OPTIMIZERS: tuple[type[Optimizer], ...] = ()
