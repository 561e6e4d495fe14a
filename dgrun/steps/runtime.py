"""Process-wide torch settings, applied before the model loads."""

from __future__ import annotations

from typing import Any

from dgrun.optimizer import ApplyContext, Optimizer, Stage, StepParams


class TF32Params(StepParams):
    enabled: bool = True


class TF32(Optimizer):
    """TensorFloat-32 matmuls and convolutions on Ampere+ GPUs: faster fp32 at ~fp16-like mantissa."""

    name = "tf32"
    summary = "TF32 matmul/cuDNN on NVIDIA GPUs (and float32 matmul precision 'high')"
    Params = TF32Params
    stage = Stage.PROCESS

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        if ctx.env.device_kind != "cuda":
            return f"no-op on {ctx.env.device_kind}: TF32 is a CUDA feature"
        import torch

        enabled = self.params.enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        capability = ctx.env.cuda_capability
        if enabled and capability is not None and capability < (8, 0):
            return f"set, but compute capability {capability[0]}.{capability[1]} has no TF32 units"
        return None


OPTIMIZERS: tuple[type[Optimizer], ...] = (TF32,)
