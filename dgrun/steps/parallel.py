"""Model parallelism: diffusers' context parallelism (Ulysses / ring attention) across the ranks of a launch.

Every rank of the context-parallel group works on the same image, each on a slice of the sequence, so the
runner stops sharding prompts over those ranks (`ranks_per_image`) and only the group's first rank writes.
Rules, and why:
- it needs a torchrun / accelerate launch whose world size is exactly ulysses_degree × ring_degree: that
  is the mesh diffusers builds; mixing it with data parallelism is not supported yet;
- it needs CUDA: diffusers 0.42 puts each rank on `torch.accelerator` (rank % device_count, which is 0 on
  a CPU-only machine) and its attention collectives are written for NCCL, so CPU/gloo cannot run it;
- it excludes the offloading steps (hooks that move weights per call break the sharded attention), and it
  rewrites the attention processors, so `compile` comes after it;
- transformer models only: UNets have no context-parallel plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from dgrun.distributed import Distributed
from dgrun.errors import UsageError
from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_OFFLOAD,
    TAG_PARALLEL,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Environment,
    ModelKind,
    Optimizer,
    StepParams,
)


class ContextParallelParams(StepParams):
    ulysses_degree: int = Field(1, ge=1)
    ring_degree: int = Field(1, ge=1)
    components: ComponentNames | None = None

    @model_validator(mode="after")
    def _at_least_two(self) -> ContextParallelParams:
        if self.ulysses_degree * self.ring_degree < 2:
            raise ValueError("ulysses_degree × ring_degree must be at least 2")
        return self


class ContextParallel(Optimizer[ContextParallelParams]):
    """Split each image's attention sequence over ulysses_degree × ring_degree GPUs (one launch)."""

    name = "context_parallel"
    summary = "diffusers context parallelism: Ulysses / ring attention over the ranks of a torchrun launch"
    Params = ContextParallelParams
    tags = frozenset({TAG_PARALLEL, TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_OFFLOAD})
    applies_to = frozenset({ModelKind.TRANSFORMER})

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        degree = _degree(params)
        try:
            world = Distributed.from_env().world_size
        except UsageError as exc:
            return str(exc)
        if world != degree:
            return (
                f"needs a distributed launch with world size = ulysses_degree × ring_degree = {degree} "
                f"(torchrun --nproc_per_node {degree} -m dgrun RECIPE); this run has world size {world}"
            )
        if env.device_kind != "cuda":
            return (
                f"needs CUDA: diffusers' context parallelism places ranks on accelerators and uses NCCL "
                f"collectives, CPU/gloo is not supported; this run uses {env.device_kind}"
            )
        return None

    @property
    def ranks_per_image(self) -> int:
        """How many ranks make each image together: the runner shards prompts over the rest."""
        return _degree(self.params)

    def apply(self, pipe: Any, ctx: ApplyContext) -> str:
        from diffusers import ContextParallelConfig

        params = self.params
        names = params.components or ["transformer"]
        config = ContextParallelConfig(ulysses_degree=params.ulysses_degree, ring_degree=params.ring_degree)
        for name in names:
            model = getattr(pipe, name, None)
            if model is None or not hasattr(model, "enable_parallelism"):
                raise ValueError(f"the pipeline has no {name!r} model that supports enable_parallelism")
            model.enable_parallelism(config=config)
        return f"ulysses {params.ulysses_degree} × ring {params.ring_degree} on {', '.join(names)}"


def _degree(params: StepParams | None) -> int:
    if not isinstance(params, ContextParallelParams):
        return 2
    return params.ulysses_degree * params.ring_degree


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(ContextParallel)
