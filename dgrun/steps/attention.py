"""Attention: choosing a diffusers attention backend, xFormers, and fusing the q/k/v projections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from dgrun.optimizer import (
    TAG_ATTENTION,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Environment,
    ModelKind,
    Optimizer,
    StepParams,
    StepResult,
)
from dgrun.steps.denoiser import components, denoiser_name


@dataclass(frozen=True)
class BackendNeeds:
    """What a diffusers attention backend needs to be usable (checked without importing it)."""

    package: str | None = None
    cuda: bool = False
    capability: tuple[int, int] | None = None
    diffusers_name: str | None = None


_FLASH = BackendNeeds("flash_attn", cuda=True)
_FLASH_3 = BackendNeeds("flash_attn_interface", cuda=True, capability=(9, 0), diffusers_name="_flash_3")
_SAGE = BackendNeeds("sageattention", cuda=True)
_HUB = BackendNeeds("kernels", cuda=True)
_CUDA_NATIVE = BackendNeeds(cuda=True)

# Names as diffusers' AttentionBackendName spells them, plus `flash_3` for diffusers' `_flash_3`.
BACKENDS: dict[str, BackendNeeds] = {
    "native": BackendNeeds(),
    "_native_math": BackendNeeds(),
    "flex": BackendNeeds(),
    "_native_cudnn": _CUDA_NATIVE,
    "_native_efficient": _CUDA_NATIVE,
    "_native_flash": _CUDA_NATIVE,
    "flash": _FLASH,
    "flash_varlen": _FLASH,
    "flash_3": _FLASH_3,
    "_flash_3": _FLASH_3,
    "_flash_varlen_3": BackendNeeds("flash_attn_interface", cuda=True, capability=(9, 0)),
    "sage": _SAGE,
    "sage_varlen": _SAGE,
    "xformers": BackendNeeds("xformers", cuda=True),
    "flash_hub": _HUB,
    "flash_varlen_hub": _HUB,
    "_flash_3_hub": _HUB,
    "sage_hub": _HUB,
}


def backend_unavailable(name: str, env: Environment) -> str | None:
    """Why backend `name` cannot run here, or None."""
    needs = BACKENDS[name]
    if needs.package and not env.has_package(needs.package):
        return f"package {needs.package} is not installed"
    if needs.cuda and env.device_kind != "cuda":
        return f"needs CUDA; this run uses {env.device_kind}"
    if needs.capability and env.cuda_capability is not None and env.cuda_capability < needs.capability:
        have = ".".join(map(str, env.cuda_capability))
        want = ".".join(map(str, needs.capability))
        return f"needs compute capability {want}+, this GPU has {have}"
    return None


class AttentionBackendParams(StepParams):
    backend: str | list[str] = Field(
        description="a backend name, or an ordered list: the first usable one wins"
    )

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("give at least one backend")
        unknown = [n for n in names if n not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown attention backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
        return value

    def candidates(self) -> list[str]:
        return [self.backend] if isinstance(self.backend, str) else list(self.backend)


class AttentionBackend(Optimizer):
    """Route every attention call of the transformer through one diffusers backend (flash, sage, …)."""

    name = "attention_backend"
    summary = "diffusers attention backend; a list = first usable one"
    Params = AttentionBackendParams
    tags = frozenset({TAG_ATTENTION})
    applies_to = frozenset({ModelKind.TRANSFORMER})

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        if params is None:
            return None
        reasons = [f"{n}: {r}" for n in params.candidates() if (r := backend_unavailable(n, env))]
        if len(reasons) == len(params.candidates()):
            return "no listed backend is usable here (" + "; ".join(reasons) + ")"
        return None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | StepResult | None:
        module = getattr(pipe, denoiser_name(pipe))
        passed_over: list[str] = []
        for name in self.params.candidates():
            reason = backend_unavailable(name, ctx.env)
            if reason is None:
                try:
                    module.set_attention_backend(BACKENDS[name].diffusers_name or name)
                except (RuntimeError, ValueError, ImportError) as exc:
                    reason = str(exc).split("\n")[0]
            if reason is None:
                if passed_over:
                    return StepResult("fell back", f"fell back to {name} ({'; '.join(passed_over)})")
                return f"using {name}"
            passed_over.append(f"{name}: {reason}")
        raise RuntimeError("no listed attention backend could be set: " + "; ".join(passed_over))


class XformersParams(StepParams):
    components: ComponentNames | None = Field(
        None, description="default: every component of the pipeline (diffusers' pipeline-level switch)"
    )


class Xformers(Optimizer):
    """xFormers memory-efficient attention through diffusers' own switch (UNet processors included).

    Unlike `attention_backend: xformers`, this also reaches UNet and VAE attention processors, which
    `set_attention_backend` leaves alone; it excludes every other attention choice.
    """

    name = "xformers"
    summary = "xFormers memory-efficient attention (enable_xformers_memory_efficient_attention)"
    Params = XformersParams
    tags = frozenset({TAG_ATTENTION})
    # Both replace the attention processors: whichever runs later silently undoes the other.
    conflicts = frozenset({"#" + TAG_ATTENTION, "fuse_qkv"})
    requires_packages = ("xformers",)
    requires_devices = frozenset({"cuda"})

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        """Every missing requirement at once, so one look tells what this machine lacks."""
        reasons = []
        if not env.has_package("xformers"):
            reasons.append("the package xformers (not installed)")
        if env.device_kind != "cuda":
            reasons.append(f"a CUDA device; this run uses {env.device_kind}")
        return "needs " + " and ".join(reasons) if reasons else None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str:
        if self.params.components is None:
            pipe.enable_xformers_memory_efficient_attention()
            return "in every component"
        names = []
        for component_name, module in components(pipe, self.params.components):
            if not hasattr(module, "enable_xformers_memory_efficient_attention"):
                raise RuntimeError(f"{type(module).__name__} ({component_name}) has no xFormers switch")
            module.enable_xformers_memory_efficient_attention()
            names.append(component_name)
        return f"in {', '.join(names)}"


class FuseQkvParams(StepParams):
    components: ComponentNames | None = Field(None, description="default: the denoiser")


class FuseQkv(Optimizer):
    """Fuse each attention's q, k, v projections into one matmul (fewer, larger kernels)."""

    name = "fuse_qkv"
    summary = "fuse attention q/k/v projections into one matmul"
    Params = FuseQkvParams
    tags = frozenset({TAG_REWRITES_MODULES})

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        fused = []
        for component_name, module in components(pipe, self.params.components):
            if not hasattr(module, "fuse_qkv_projections"):
                raise RuntimeError(
                    f"{type(module).__name__} ({component_name}) cannot fuse q/k/v projections"
                )
            module.fuse_qkv_projections()
            fused.append(component_name)
        return f"fused in {', '.join(fused)}"


OPTIMIZERS: tuple[type[Optimizer], ...] = (AttentionBackend, Xformers, FuseQkv)
