"""Offloading: keep weights off the accelerator until they are needed."""

from __future__ import annotations

from dgrun.optimizer import Optimizer

OPTIMIZERS: tuple[type[Optimizer], ...] = ()
