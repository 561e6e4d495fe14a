"""torch.compile of pipeline components, with a fallback to eager when compilation fails."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dgrun.optimizer import TAG_REWRITES_MODULES, ApplyContext, ComponentNames, Optimizer, StepParams
from dgrun.steps.denoiser import components
from dgrun.steps.inductor_flags import InductorFlags

Backend = Literal["inductor", "aot_eager", "aot_eager_decomp_partition", "eager", "cudagraphs"]


class CompileParams(StepParams):
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fullgraph: bool = False
    dynamic: bool | None = None
    components: ComponentNames | None = Field(None, description="default: the denoiser (unet or transformer)")
    regional: bool = Field(False, description="compile only the repeated blocks (faster compile, same speed)")
    vae_decode: bool = Field(False, description="also compile the VAE decoder")
    backend: Backend = Field(
        "inductor",
        description="torch.compile backend: inductor, or a debugging backend (aot_eager, eager, ...); "
        "backends that run outside compilers are not accepted from a recipe",
    )
    inductor: InductorFlags | None = Field(
        None,
        description="torch._inductor.config performance knobs for this compile only, e.g. "
        "{coordinate_descent_tuning: true, epilogue_fusion: false, triton.cudagraphs: false}",
    )

    @model_validator(mode="after")
    def _inductor_needs_inductor(self) -> CompileParams:
        if self.inductor and self.inductor.options() and self.backend != "inductor":
            raise ValueError(f"inductor flags need backend: inductor (backend is {self.backend!r})")
        return self


def inductor_options(mode: str, flags: InductorFlags) -> dict[str, Any]:
    """The mode's inductor options plus `flags`, checked against the installed torch._inductor.config.

    torch.compile takes `mode` or `options`, not both, so the mode is spelled out as its options; passed as
    `options`, the flags patch inductor's config only while this compile runs, never process-wide.
    """
    from torch._inductor import config, list_mode_options

    known = config.get_config_copy()
    chosen = flags.options()
    missing = [name for name in chosen if name not in known]
    if missing:
        raise ValueError(
            f"this torch ({_torch_version()}) has no inductor flag {', '.join(map(repr, missing))}; "
            "remove it from the recipe"
        )
    return {**list_mode_options(mode), **chosen}


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


class Compile(Optimizer):
    """torch.compile the denoiser (in place, so the pipeline and its state dict keep their shape).

    Compilation happens at the first call; if it fails there, `recover` restores eager modules so the
    runner can retry — one console line and a record entry instead of a crash.
    """

    name = "compile"
    summary = "torch.compile the denoiser (regional = repeated blocks only); falls back to eager"
    Params = CompileParams
    after = frozenset({"#" + TAG_REWRITES_MODULES})

    def __init__(self, params: CompileParams):
        super().__init__(params)
        self._compiled: list[Any] = []
        self._vae: Any = None

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"fullgraph": self.params.fullgraph, "dynamic": self.params.dynamic}
        options["backend"] = self.params.backend
        if self.params.inductor and self.params.inductor.options():
            options["options"] = inductor_options(self.params.mode, self.params.inductor)
        elif self.params.backend == "inductor":
            options["mode"] = self.params.mode
        return options

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        import torch

        options = self._options()
        names = []
        for component_name, module in components(pipe, self.params.components):
            if not isinstance(module, torch.nn.Module):
                raise RuntimeError(f"component {component_name!r} is not a torch module")
            if self.params.regional:
                blocks = getattr(module, "_repeated_blocks", None) or []
                targets = [m for m in module.modules() if type(m).__name__ in blocks]
                if not targets:
                    raise RuntimeError(
                        f"{type(module).__name__} declares no repeated blocks; use regional: false"
                    )
            else:
                targets = [module]
            for target in targets:
                target.compile(**options)
                self._compiled.append(target)
            names.append(
                f"{component_name} ({len(targets)} regions)" if self.params.regional else component_name
            )
        if self.params.vae_decode:
            vae = pipe.vae
            vae.decode = torch.compile(vae.decode, **options)
            self._vae = vae
            names.append("vae.decode")
        detail = f"{', '.join(names)} with {self.params.backend}"
        if self.params.backend == "inductor":
            detail += f" {self.params.mode}"
        flags = self.params.inductor.options() if self.params.inductor else {}
        if flags:
            detail += " + " + ", ".join(f"{k}={v}" for k, v in flags.items())
        return detail

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """Undo every compilation: the modules run eagerly again."""
        if not self._compiled and self._vae is None:
            return None
        for module in self._compiled:
            module._compiled_call_impl = None
        self._compiled.clear()
        if self._vae is not None:
            del self._vae.decode
            self._vae = None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"fell back to eager: compilation failed ({type(error).__name__}: {first_line[:200]})"


OPTIMIZERS: tuple[type[Optimizer], ...] = (Compile,)
