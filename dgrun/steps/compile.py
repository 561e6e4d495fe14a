"""torch.compile of pipeline components, with a fallback to eager when compilation fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_CACHE,
    TAG_PER_STEP_PYTHON,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Optimizer,
    PlanView,
    StepEffect,
    StepParams,
)
from dgrun.steps.denoiser import components
from dgrun.steps.inductor_flags import InductorFlags

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
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
        if self.regional and self.uses_cuda_graphs():
            raise ValueError(
                f"mode {self.mode} records CUDA graphs, which reuse their output buffers: regional compile "
                "calls each block's graph many times per step, so one call overwrites the last one's output; "
                "use mode max-autotune-no-cudagraphs (or default) with regional: true"
            )
        return self

    def uses_cuda_graphs(self) -> bool:
        """Whether this compile records CUDA graphs (the mode's, or an explicit inductor flag)."""
        flags = self.inductor.options() if self.inductor else {}
        if "triton.cudagraphs" in flags:
            return bool(flags["triton.cudagraphs"])
        return self.backend == "cudagraphs" or self.mode in CUDA_GRAPH_MODES


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


class Compile(Optimizer[CompileParams]):
    """torch.compile the denoiser (in place, so the pipeline and its state dict keep their shape).

    Compilation happens at the first call; if it fails there, `recover` restores eager modules so the
    runner can retry — one console line and a record entry instead of a crash.
    """

    name = "compile"
    summary = "torch.compile the denoiser (regional = repeated blocks only); falls back to eager"
    Params = CompileParams
    after = frozenset({"#" + TAG_REWRITES_MODULES})
    conflicts = frozenset({"#" + TAG_PER_STEP_PYTHON})
    conflict_reasons: ClassVar[dict[str, str]] = {
        "#" + TAG_PER_STEP_PYTHON: (
            "it decides in Python at every step which blocks run, and dynamo guards on that state: the "
            "compiled UNet recompiles each step until dynamo's recompile limit, then runs mostly eager. "
            "Measured on dgrun:default (8 prompts, 20 steps, 2 threads): DeepCache alone 3.22x, compile "
            "alone 1.77x, both 1.94x; compiling only the blocks DeepCache calls 2.58x. Use DeepCache alone"
        )
    }

    def __init__(self, params: CompileParams):
        super().__init__(params)
        self._compiled: list[Any] = []
        self._vae: Any = None
        self._watch: Any = None
        self._names: list[str] = []

    @classmethod
    def combination_problem(cls, params: StepParams, plan: PlanView) -> str | None:
        if not isinstance(params, CompileParams) or not params.uses_cuda_graphs():
            return None
        caches = plan.named(TAG_CACHE)
        if caches:
            return (
                f"mode {params.mode} records CUDA graphs, whose outputs the next call overwrites; "
                f"{caches[0]} keeps outputs of earlier steps to reuse them, so it would read overwritten "
                "memory: use mode max-autotune-no-cudagraphs"
            )
        true_cfg = plan.recipe.generate.extra.get("true_cfg_scale") if plan.recipe is not None else None
        if isinstance(true_cfg, (int, float)) and true_cfg > 1:
            return (
                f"mode {params.mode} records CUDA graphs, whose outputs the next call overwrites; true CFG "
                "(true_cfg_scale > 1) calls the transformer twice per step and keeps the first output: "
                "use mode max-autotune-no-cudagraphs"
            )
        return None

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

        from dgrun.effects import CompileWatch

        options = self._options()
        self._watch = CompileWatch()
        names = self._names
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

    def effect(self, pipe: Any) -> StepEffect | None:
        if self._watch is None:
            return None
        watch, self._watch = self._watch, None
        return watch.effect(" and ".join(self._names) or "the model")

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """A failure while compiling (not in code the compiled graph runs): the modules run eagerly again."""
        if (not self._compiled and self._vae is None) or not _compiler_failed(error):
            return None
        for module in self._compiled:
            module._compiled_call_impl = None
        self._compiled.clear()
        if self._vae is not None:
            del self._vae.decode
            self._vae = None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"fell back to eager: compilation failed ({type(error).__name__}: {first_line[:200]})"


def _compiler_failed(error: BaseException) -> bool:
    """Whether dynamo or inductor failed to compile (an error raised by the compiled model's own code, e.g. an
    attention kernel, belongs to the step that chose that code)."""
    import torch._inductor.exc
    from torch._dynamo.exc import TorchDynamoException

    inductor_errors = tuple(
        v
        for v in vars(torch._inductor.exc).values()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == "torch._inductor.exc"
    )
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (TorchDynamoException, *inductor_errors)):
            return True
        seen = seen.__cause__
    return False


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(Compile)
