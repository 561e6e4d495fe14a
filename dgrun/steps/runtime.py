"""Process-wide torch settings, applied before the model loads."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pydantic import Field

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import ApplyContext, Optimizer, Stage, StepEffect, StepParams

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


class TF32Params(StepParams):
    enabled: bool = True


class TF32(Optimizer[TF32Params]):
    """TensorFloat-32 matmuls and convolutions on Ampere+ GPUs: faster fp32 at ~fp16-like mantissa."""

    name = "tf32"
    summary = "TF32 matmul/cuDNN on NVIDIA GPUs (and float32 matmul precision 'high')"
    Params = TF32Params
    stage = Stage.PROCESS

    def __init__(self, params: TF32Params):
        super().__init__(params)
        self.device_kind = ""
        self.saved: tuple[Any, ...] | None = None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        self.device_kind = ctx.env.device_kind
        if ctx.env.device_kind != "cuda":
            return f"no-op on {ctx.env.device_kind}: TF32 is a CUDA feature"
        import torch

        enabled = self.params.enabled
        self.saved = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        capability = ctx.env.cuda_capability
        if enabled and capability is not None and capability < (8, 0):
            return f"set, but compute capability {capability[0]}.{capability[1]} has no TF32 units"
        return None

    def effect(self, pipe: Any) -> StepEffect | None:
        if self.device_kind != "cuda":
            return _cuda_only("TF32", self.device_kind)
        return None

    def undo(self) -> None:
        if self.saved is None:
            return
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved[:2]
        torch.set_float32_matmul_precision(self.saved[2])
        self.saved = None


def _cuda_only(feature: str, device_kind: str) -> StepEffect:
    return StepEffect(
        {"device": device_kind},
        f"{feature} is a CUDA feature",
        no_effect=f"{feature} does nothing on {device_kind}",
    )


class CudnnBenchmarkParams(StepParams):
    enabled: bool = True


class CudnnBenchmark(Optimizer[CudnnBenchmarkParams]):
    """Let cuDNN time its convolution algorithms per input shape and keep the fastest.

    The first call of each shape is slower, and the chosen algorithm may differ from run to run, so images
    can differ in the last bits between runs on the same GPU.
    """

    name = "cudnn_benchmark"
    summary = "cuDNN autotunes convolution algorithms per shape (CUDA; first call slower)"
    Params = CudnnBenchmarkParams
    stage = Stage.PROCESS

    def __init__(self, params: CudnnBenchmarkParams):
        super().__init__(params)
        self.device_kind = ""
        self.saved: bool | None = None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        self.device_kind = ctx.env.device_kind
        if ctx.env.device_kind != "cuda":
            return f"no-op on {ctx.env.device_kind}: cuDNN is a CUDA library"
        import torch

        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.params.enabled
        return None

    def effect(self, pipe: Any) -> StepEffect | None:
        return _cuda_only("cuDNN autotuning", self.device_kind) if self.device_kind != "cuda" else None

    def undo(self) -> None:
        if self.saved is not None:
            import torch

            torch.backends.cudnn.benchmark = self.saved
            self.saved = None


class CudaMemoryParams(StepParams):
    fraction: float | None = Field(
        None, gt=0, le=1, description="cap this process at this fraction of the GPU's memory (null: no cap)"
    )
    expandable_segments: bool = Field(
        True, description="let the caching allocator grow segments instead of fragmenting memory"
    )


def merge_alloc_conf(current: str | None, key: str, value: str) -> str:
    """`current` (an allocator config string such as "a:1,b:2") with `key` set to `value`."""
    entries = [e.strip() for e in (current or "").split(",") if e.strip()]
    kept = [e for e in entries if e.split(":", 1)[0].strip() != key]
    return ",".join([*kept, f"{key}:{value}"])


class CudaMemory(Optimizer[CudaMemoryParams]):
    """CUDA caching-allocator settings: a per-process memory cap and expandable segments.

    Expandable segments cut fragmentation when tensor sizes vary (e.g. several resolutions or batch sizes).
    torch reads PYTORCH_CUDA_ALLOC_CONF once, when the allocator first needs its config: the runner sets it
    from `process_environment` before it probes the GPU, so it covers every allocation. Where CUDA was
    already initialised (a second run in one process, e.g. a bench variant) it is also handed to torch's
    run-time allocator settings, and the record says so. `undo` puts back the variable and the cap.
    """

    name = "cuda_memory"
    summary = "CUDA allocator: memory fraction cap, expandable segments"
    Params = CudaMemoryParams
    stage = Stage.PROCESS
    requires_devices = frozenset({"cuda"})

    def __init__(self, params: CudaMemoryParams):
        super().__init__(params)
        self.saved_conf: tuple[bool, str | None] | None = None
        self.capped: int | None = None

    @classmethod
    def process_environment(cls, params: StepParams) -> dict[str, str]:
        if not isinstance(params, CudaMemoryParams):
            return {}
        value = "True" if params.expandable_segments else "False"
        return {ALLOC_CONF: merge_alloc_conf(os.environ.get(ALLOC_CONF), "expandable_segments", value)}

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        notes = []
        value = "True" if self.params.expandable_segments else "False"
        initialised = torch.cuda.is_initialized()
        previous = os.environ.get(ALLOC_CONF)
        self.saved_conf = (ALLOC_CONF in os.environ, previous)
        os.environ[ALLOC_CONF] = merge_alloc_conf(previous, "expandable_segments", value)
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is not None:
            setter(f"expandable_segments:{value}")
        elif initialised:  # older torch: only the (now deprecated) cuda-specific setter exists
            torch.cuda.memory._set_allocator_settings(f"expandable_segments:{value}")
        if initialised:
            # Cached blocks keep their old layout; releasing them lets new allocations use the new setting.
            torch.cuda.empty_cache()
            notes.append(
                f"expandable_segments:{value} set at run time (CUDA was already initialised, so it covers "
                "memory allocated from now on; cached blocks were released)"
            )
        else:
            notes.append(f"{ALLOC_CONF}={os.environ[ALLOC_CONF]} set before CUDA initialised")
        if previous:
            notes.append(f"was {ALLOC_CONF}={previous}")
        if self.params.fraction is not None:
            device = torch.device(ctx.env.device)
            index = device.index if device.index is not None else 0
            torch.cuda.set_per_process_memory_fraction(self.params.fraction, index)
            self.capped = index
            notes.append(f"memory fraction {self.params.fraction:g} of cuda:{index}")
        return "; ".join(notes)

    def undo(self) -> None:
        if self.saved_conf is not None:
            present, value = self.saved_conf
            if present and value is not None:
                os.environ[ALLOC_CONF] = value
            else:
                os.environ.pop(ALLOC_CONF, None)
            self.saved_conf = None
        if self.capped is not None:
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, self.capped)
            self.capped = None


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(TF32)
    register(CudnnBenchmark)
    register(CudaMemory)
