"""Attention: choosing a diffusers attention backend, xFormers, and fusing the q/k/v projections."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from dgrun.effects import FunctionCounter
from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_ATTENTION,
    TAG_CHANGES_WEIGHTS,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Environment,
    ModelKind,
    Optimizer,
    PlanView,
    StepEffect,
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
    min_version: str | None = None  # of `package`, where diffusers needs a newer API than old releases have


_FLASH = BackendNeeds("flash_attn", cuda=True)
_FLASH_3 = BackendNeeds("flash_attn_interface", cuda=True, capability=(9, 0), diffusers_name="_flash_3")
_SAGE = BackendNeeds("sageattention", cuda=True, min_version="2.1.1")
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
    if needs.package and needs.min_version and not _version_at_least(needs.package, needs.min_version):
        return f"needs {needs.package} {needs.min_version} or newer (diffusers calls its newer API)"
    if needs.cuda and env.device_kind != "cuda":
        return f"needs CUDA; this run uses {env.device_kind}"
    if needs.capability and env.cuda_capability is not None and env.cuda_capability < needs.capability:
        have = ".".join(map(str, env.cuda_capability))
        want = ".".join(map(str, needs.capability))
        return f"needs compute capability {want}+, this GPU has {have}"
    return None


def _version_at_least(package: str, wanted: str) -> bool:
    """Whether the installed distribution of `package` is at least `wanted` (unknown version: assume so)."""
    from importlib import metadata

    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:
        return True
    return _numbers(installed) >= _numbers(wanted)


def _numbers(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


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


class AttentionBackend(Optimizer[AttentionBackendParams]):
    """Route every attention call of the transformer through one diffusers backend (flash, sage, …).

    Each candidate is set, then probed once with a real attention call on the run's device, in the
    model's dtype and head size: a backend that imports but cannot run here (flash-attn in float32, an
    old GPU, a hub kernel that cannot be fetched) is passed over at apply time, and if the first pipeline
    call still fails inside it, `recover` moves to the next candidate. diffusers' active backend is
    process-wide; `undo` puts back the one this step found.
    """

    name = "attention_backend"
    summary = "diffusers attention backend; a list = first usable one (probed on the device)"
    Params = AttentionBackendParams
    tags = frozenset({TAG_ATTENTION})
    applies_to = frozenset({ModelKind.TRANSFORMER})

    def __init__(self, params: AttentionBackendParams):
        super().__init__(params)
        self.module: Any = None
        self.chosen: str | None = None
        self.remaining: list[str] = []
        self.previous_active: Any = None
        self.counter: FunctionCounter | None = None
        self.passed_over: list[str] = []

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        if params is None:
            return None
        reasons = [f"{n}: {r}" for n in params.candidates() if (r := backend_unavailable(n, env))]
        if len(reasons) == len(params.candidates()):
            return "no listed backend is usable here (" + "; ".join(reasons) + ")"
        return None

    @classmethod
    def combination_problem(cls, params: StepParams, plan: PlanView) -> str | None:
        if not isinstance(params, AttentionBackendParams) or "flex" not in params.candidates():
            return None
        names = [cls_.name for cls_, _ in plan.steps]
        if "compile" not in names[names.index(cls.name) + 1 :]:
            return (
                "flex attention without a later `compile` step runs unfused: it builds the full attention "
                "score matrix (memory grows with the square of the sequence) and is slower than native; "
                "add `compile` after it, or choose another backend"
            )
        return None

    @classmethod
    def pipeline_problem(cls, pipeline_class: str) -> str | None:
        if pipeline_class.startswith("StableDiffusion3"):
            return (
                "SD3's JointAttnProcessor2_0 calls PyTorch's SDPA itself, so no diffusers attention backend "
                "reaches it (the step would have no effect)"
            )
        return None

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | StepResult | None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        self.module = getattr(pipe, denoiser_name(pipe))
        self.previous_active = _AttentionBackendRegistry._active_backend
        self.remaining = self.params.candidates()
        routed = self._set_next(ctx)
        if self.passed_over:
            return StepResult(
                "fell back", f"fell back to {self.chosen} ({'; '.join(self.passed_over)}); {routed}"
            )
        return f"using {self.chosen}; {routed}"

    def _set_next(self, ctx: ApplyContext | None) -> str:
        """Set and probe candidates in order until one works; raise when none does."""
        while self.remaining:
            name = self.remaining.pop(0)
            reason = backend_unavailable(name, ctx.env) if ctx is not None else None
            if reason is None:
                try:
                    self.module.set_attention_backend(BACKENDS[name].diffusers_name or name)
                    routed = routed_modules(self.module)
                    if not routed:
                        raise RuntimeError(
                            f"no attention processor of {type(self.module).__name__} routes through "
                            "diffusers' backends"
                        )
                    probe_backend(self.module, BACKENDS[name].diffusers_name or name)
                except Exception as exc:  # hub kernels raise plain Exceptions (e.g. connection errors)
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if reason is None:
                self.chosen = name
                self._count_calls()
                return f"{routed} attention modules routed"
            self.passed_over.append(f"{name}: {reason}")
        raise RuntimeError("no listed attention backend could be set: " + "; ".join(self.passed_over))

    def _count_calls(self) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        if self.counter is not None:
            self.counter.restore()
        key = AttentionBackendName(BACKENDS[self.chosen].diffusers_name or self.chosen)
        self.counter = FunctionCounter(_AttentionBackendRegistry._backends, key=key)

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """The first call failed inside the chosen backend: move on to the next candidate."""
        if self.chosen is None or not self.remaining or not _raised_in_attention(error):
            return None
        failed = self.chosen
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self.passed_over.append(f"{failed}: failed at the first call ({first})")
        try:
            self._set_next(None)
        except RuntimeError:
            return None
        return f"fell back to {self.chosen} ({'; '.join(self.passed_over)})"

    def effect(self, pipe: Any) -> StepEffect | None:
        if self.module is None or self.counter is None:
            return None
        modules = routed_modules(self.module)
        calls = self.counter.calls
        self.counter.restore()
        self.counter = None
        counters = {"backend": self.chosen, "attention_modules": modules, "calls_routed": calls}
        summary = f"{calls} attention calls through {self.chosen} ({modules} modules)"
        if calls == 0:
            return StepEffect(counters, summary, no_effect=f"no attention call went through {self.chosen}")
        return StepEffect(counters, summary)

    def undo(self) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        if self.counter is not None:
            self.counter.restore()
            self.counter = None
        if self.previous_active is not None:
            _AttentionBackendRegistry.set_active_backend(self.previous_active)


def routed_modules(module: Any) -> int:
    """Attention modules whose processor dispatches through diffusers' backends."""
    return sum(
        1
        for child in module.modules()
        if getattr(getattr(child, "processor", None), "_attention_backend", None) is not None
    )


def probe_backend(module: Any, backend: str) -> None:
    """One small attention call through `backend`, on the module's device, dtype and head size."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    attention = next(
        c for c in module.modules() if getattr(getattr(c, "processor", None), "_attention_backend", None)
    )
    heads = int(getattr(attention, "heads", 1) or 1)
    width = getattr(getattr(attention, "to_q", None), "out_features", None) or 64 * heads
    parameter = next(module.parameters())
    shape = (1, 16, heads, max(1, width // heads))
    q, k, v = (torch.randn(shape, device=parameter.device, dtype=parameter.dtype) for _ in range(3))
    with torch.inference_mode():
        dispatch_attention_fn(q, k, v, backend=backend)


def _raised_in_attention(error: BaseException) -> bool:
    """Whether the traceback passes through diffusers' attention dispatch."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("attention_dispatch.py"):
            return True
        tb = tb.tb_next
    return False


class XformersParams(StepParams):
    components: ComponentNames | None = Field(
        None, description="default: every component of the pipeline (diffusers' pipeline-level switch)"
    )


class Xformers(Optimizer[XformersParams]):
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

    def effect(self, pipe: Any) -> StepEffect | None:
        processors = [
            type(m.processor).__name__
            for component in getattr(pipe, "components", {}).values()
            if hasattr(component, "modules")
            for m in component.modules()
            if hasattr(m, "processor")
        ]
        xformers = sum(1 for name in processors if "XFormers" in name)
        counters = {"attention_modules": len(processors), "xformers_processors": xformers}
        summary = f"{xformers} of {len(processors)} attention processors use xFormers"
        return StepEffect(counters, summary, no_effect=None if xformers else "no processor uses xFormers")

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


class FuseQkv(Optimizer[FuseQkvParams]):
    """Fuse each attention's q, k, v projections into one matmul (fewer, larger kernels)."""

    name = "fuse_qkv"
    summary = "fuse attention q/k/v projections into one matmul"
    Params = FuseQkvParams
    tags = frozenset({TAG_REWRITES_MODULES, TAG_CHANGES_WEIGHTS})

    def effect(self, pipe: Any) -> StepEffect | None:
        modules = [m for c in getattr(self, "fused_modules", []) for m in c.modules()]
        fused = sum(1 for m in modules if getattr(m, "fused_projections", False))
        counters = {"fused_attention_modules": fused}
        if fused == 0:
            reason = "no attention module has fused projections"
            return StepEffect(counters, "no attention fused", no_effect=reason)
        return StepEffect(counters, f"{fused} attention modules run one q/k/v matmul")

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        fused = []
        for component_name, module in components(pipe, self.params.components):
            if not hasattr(module, "fuse_qkv_projections"):
                raise RuntimeError(
                    f"{type(module).__name__} ({component_name}) cannot fuse q/k/v projections"
                )
            module.fuse_qkv_projections()
            self.fused_modules = [*getattr(self, "fused_modules", []), module]
            fused.append(component_name)
        return f"fused in {', '.join(fused)}"


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(AttentionBackend)
    register(Xformers)
    register(FuseQkv)
