"""Storage precision and memory layout of weights and activations."""

from __future__ import annotations

from dgrun.optimizer import Optimizer

OPTIMIZERS: tuple[type[Optimizer], ...] = ()
