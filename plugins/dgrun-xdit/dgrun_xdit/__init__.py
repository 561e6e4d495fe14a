"""dgrun plugin: the `xdit` step, xDiT's (xfuser) hybrid parallel inference across the ranks of a launch.

xDiT splits one image's work over GPUs — Unified Sequence Parallel (Ulysses × ring attention), CFG
parallel, PipeFusion (patch pipelining over block stages), tensor parallel — and runs data-parallel groups
side by side. Every rank of a `torchrun` launch runs the recipe; the step wraps the loaded diffusers
pipeline in `xfuser.xDiTParallel`, so the recipe's other steps and dgrun's records stay as they are.

How it meets dgrun's own data parallelism (`dgrun.distributed`): xDiT orders its mesh with data parallel
outermost, so the ranks that make one image together are world_size / data_parallel_degree consecutive
ranks. dgrun gives each such group its own prompts, and the group's last rank — where xDiT leaves the
images (world rank 0 with use_parallel_vae) — writes them. xDiT would split a call's prompt list over its
data-parallel groups a second time, so with data_parallel_degree > 1 every call carries one prompt.

Params are named as xDiT's command-line flags; `python -m dgrun_xdit` turns the `DG_XDIT_*` variables of
the launcher scripts this replaces into the equivalent recipe entry. xfuser is imported only when the step
is applied: recipes using it can be written and checked on any machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field, ValidationError, model_validator

from dgrun import ApplyContext, Environment, Optimizer, PlanView, StepParams, hookimpl
from dgrun.distributed import Distributed
from dgrun.errors import UsageError
from dgrun.optimizer import (
    TAG_ATTENTION,
    TAG_CACHE,
    TAG_CHANGES_WEIGHTS,
    TAG_OFFLOAD,
    TAG_PARALLEL,
    TAG_REWRITES_MODULES,
)

__version__ = "0.1.0"

ENV_PREFIX = "DG_XDIT_"
INSTALL_HINT = "pip install 'dgrun-xdit[xfuser]' on a machine with a CUDA build of PyTorch"


class XditParams(StepParams):
    data_parallel_degree: int = Field(
        1, ge=1, description="groups of ranks working on different prompts side by side"
    )
    use_cfg_parallel: bool = Field(
        False, description="conditional and unconditional branches on two ranks (doubles the ranks)"
    )
    ulysses_degree: int = Field(
        1, ge=1, description="Ulysses sequence parallelism: attention heads split over this many ranks"
    )
    ring_degree: int = Field(
        1, ge=1, description="ring attention: keys and values passed round this many ranks"
    )
    pipefusion_parallel_degree: int = Field(
        1, ge=1, description="PipeFusion: transformer blocks split into this many pipeline stages"
    )
    num_pipeline_patch: int | None = Field(
        None, ge=1, description="PipeFusion: patches each image is cut into; null: xDiT's default"
    )
    tensor_parallel_degree: int = Field(
        1, ge=1, description="tensor parallelism (only the models xDiT implements it for)"
    )
    use_parallel_vae: bool = Field(
        False, description="decode with DistVAE across the ranks (memory at high resolution)"
    )
    warmup_steps: int = Field(
        1, ge=0, description="PipeFusion: synchronous steps before the patch pipeline starts"
    )

    @property
    def ranks_per_image(self) -> int:
        """Ranks that make one image together: everything but data parallelism."""
        cfg = 2 if self.use_cfg_parallel else 1
        return (
            cfg
            * self.ulysses_degree
            * self.ring_degree
            * self.pipefusion_parallel_degree
            * self.tensor_parallel_degree
        )

    @property
    def world_size(self) -> int:
        """The launch size xDiT's mesh needs."""
        return self.data_parallel_degree * self.ranks_per_image

    def degree_formula(self) -> str:
        """The world size spelled out from the degrees that are not 1, e.g. `ulysses_degree 4 × cfg 2 = 8`."""
        factors = [
            (name, value)
            for name, value in (
                ("data_parallel_degree", self.data_parallel_degree),
                ("cfg", 2 if self.use_cfg_parallel else 1),
                ("ulysses_degree", self.ulysses_degree),
                ("ring_degree", self.ring_degree),
                ("pipefusion_parallel_degree", self.pipefusion_parallel_degree),
                ("tensor_parallel_degree", self.tensor_parallel_degree),
            )
            if value > 1
        ]
        return " × ".join(f"{name} {value}" for name, value in factors) + f" = {self.world_size}"

    @model_validator(mode="after")
    def _consistent(self) -> XditParams:
        if self.ranks_per_image < 2:
            if self.data_parallel_degree > 1:
                raise ValueError(
                    "only data_parallel_degree is set: dgrun runs data parallelism itself, so launch with "
                    "torchrun and drop the xdit step (it is for splitting each image over ranks)"
                )
            raise ValueError(
                "every degree is 1, so xDiT would split nothing: set ulysses_degree, ring_degree, "
                "pipefusion_parallel_degree, use_cfg_parallel or tensor_parallel_degree"
            )
        if self.num_pipeline_patch is not None and self.pipefusion_parallel_degree < 2:
            raise ValueError("num_pipeline_patch only applies with pipefusion_parallel_degree ≥ 2")
        if self.use_parallel_vae and self.data_parallel_degree > 1:
            raise ValueError(
                "use_parallel_vae gathers every data-parallel group's latents on rank 0, across dgrun's "
                "per-group prompts: use it with data_parallel_degree 1"
            )
        return self


# ------------------------------------------------------------------------------- DG_XDIT_* variables
def params_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The recipe params equivalent to the `DG_XDIT_<PARAM>` variables set (e.g. DG_XDIT_ULYSSES_DEGREE).

    Raises UsageError naming any variable that is not a param or whose value does not parse.
    """
    env = os.environ if environ is None else environ
    fields = XditParams.model_fields
    params: dict[str, Any] = {}
    problems = []
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        name = key[len(ENV_PREFIX) :].lower()
        raw = env[key].strip()
        if name not in fields:
            known = ", ".join(ENV_PREFIX + f.upper() for f in fields)
            problems.append(f"{key} is not an xdit param (known: {known})")
            continue
        annotation = fields[name].annotation
        if annotation is bool:
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                problems.append(f"{key}={raw!r}: expected true/false or 1/0")
                continue
            params[name] = raw.lower() in ("1", "true", "yes", "on")
        else:
            try:
                params[name] = int(raw)
            except ValueError:
                problems.append(f"{key}={raw!r}: expected a whole number")
    if problems:
        raise UsageError("; ".join(problems))
    return params


def ignored_environment(params: XditParams, environ: Mapping[str, str] | None = None) -> list[str]:
    """`DG_XDIT_*` settings that disagree with the recipe: they do nothing here, so the record says so."""
    try:
        from_env = params_from_environment(environ)
    except UsageError as exc:
        return [str(exc)]
    return [
        f"{ENV_PREFIX}{name.upper()}={value}"
        for name, value in from_env.items()
        if getattr(params, name) != value
    ]


# ------------------------------------------------------------------------------------------- the step
@functools.lru_cache(maxsize=1)
def _import_problem() -> str | None:
    """Why `import xfuser` fails here (None: it imports). xfuser 0.7 imports triton, absent on CPU builds."""
    try:
        import xfuser  # noqa: F401
    except Exception as exc:  # any import failure makes the step unavailable
        return f"{type(exc).__name__}: {exc}"
    return None


def xfuser_arguments(
    params: XditParams, width: int | None, height: int | None, generate: Any
) -> dict[str, Any]:
    """Keyword arguments for `xfuser.xFuserArgs`: the parallel degrees plus the shape of the calls to come.

    xDiT warms up with one call of that shape when it wraps the pipeline (`prepare_run`), so the size,
    step count and batch size are the recipe's own.
    """
    arguments: dict[str, Any] = {
        name: getattr(params, name)
        for name in (
            "data_parallel_degree",
            "use_cfg_parallel",
            "ulysses_degree",
            "ring_degree",
            "pipefusion_parallel_degree",
            "num_pipeline_patch",
            "tensor_parallel_degree",
            "use_parallel_vae",
            "warmup_steps",
        )
    }
    batch = getattr(generate, "batch_size", 1) or 1
    arguments.update(
        height=height or 1024,
        width=width or 1024,
        num_inference_steps=getattr(generate, "steps", 20),
        prompt=[""] * batch if batch > 1 else "",
        output_type="pil",
    )
    guidance = getattr(generate, "guidance_scale", None)
    if guidance is not None:
        arguments["guidance_scale"] = guidance
    return arguments


class Xdit(Optimizer[XditParams]):
    """Split each image over ranks with xDiT (USP, CFG, PipeFusion, TP); dgrun shards prompts over groups."""

    name = "xdit"
    summary = "xDiT (xfuser): Ulysses / ring / CFG / PipeFusion parallelism over a torchrun launch's ranks"
    Params = XditParams
    tags = frozenset({TAG_PARALLEL, TAG_REWRITES_MODULES})
    # The seed compatibility table: offloading ✗ xDiT, torch.compile ✗ xDiT. xDiT also installs its own
    # attention processors (so attention steps would be silently replaced), runs its own denoising loop
    # (diffusers' caches never get their cache context) and is a parallelism of its own.
    conflicts = frozenset(
        {"#" + TAG_OFFLOAD, "compile", "#" + TAG_PARALLEL, "#" + TAG_ATTENTION, "#" + TAG_CACHE}
    )
    after = frozenset({"#" + TAG_CHANGES_WEIGHTS})

    def __init__(self, params: XditParams):
        super().__init__(params)
        self.engine: Any = None

    @classmethod
    def combination_problem(cls, params: StepParams, plan: PlanView) -> str | None:
        """xDiT's FLUX pipeline takes no negative prompt and no true CFG: it would drop them silently."""
        recipe = plan.recipe
        if recipe is None or not (plan.pipeline_class or "").startswith("Flux"):
            return None
        negatives = recipe.generate.negative_prompt is not None or any(p.negative for p in recipe.prompts)
        true_cfg = recipe.generate.extra.get("true_cfg_scale")
        if negatives or (isinstance(true_cfg, (int, float)) and true_cfg > 1):
            return (
                "xDiT's FLUX pipeline ignores negative prompts and true CFG (true_cfg_scale): remove them "
                "or run this recipe without xdit"
            )
        return None

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        if not env.has_package("xfuser"):
            return f"needs the package xfuser (not installed; {INSTALL_HINT})"
        if env.probed and (problem := _import_problem()) is not None:
            return (
                f"xfuser is installed but does not import ({problem}); xDiT needs a CUDA build of "
                "PyTorch (it imports triton)"
            )
        if env.device_kind != "cuda":
            return (
                "needs CUDA: xDiT puts each rank on a GPU and runs its collectives on NCCL; "
                f"this run uses {env.device_kind}"
            )
        if not isinstance(params, XditParams):
            return None
        try:
            world = Distributed.from_env().world_size
        except UsageError as exc:
            return str(exc)
        if world != params.world_size:
            return (
                f"needs a launch of world size {params.degree_formula()} "
                f"(torchrun --nproc_per_node {params.world_size} -m dgrun RECIPE); "
                f"this run has world size {world}"
            )
        return None

    @property
    def ranks_per_image(self) -> int:
        """How many ranks make each image together: the runner shards prompts over the groups."""
        return self.params.ranks_per_image

    @property
    def image_rank_in_group(self) -> int:
        """Where xDiT leaves the images: the group's last rank, or rank 0 when the VAE is parallel."""
        return 0 if self.params.use_parallel_vae else self.ranks_per_image - 1

    def apply(self, pipe: Any, ctx: ApplyContext) -> str:
        params = self.params
        batch = getattr(ctx.generate, "batch_size", 1)
        if params.data_parallel_degree > 1 and batch > 1:
            raise ValueError(
                "with data_parallel_degree > 1 xDiT splits each call's prompts over its data-parallel "
                "groups, while dgrun already gives every group its own prompts: set generate.batch_size: 1"
            )
        from xfuser import xDiTParallel, xFuserArgs
        from xfuser.core.distributed import init_distributed_environment

        dist = Distributed.from_env()
        # dgrun has started the process group, so xDiT would skip building its world group on top of it.
        init_distributed_environment(
            world_size=dist.world_size, rank=dist.rank, local_rank=dist.local_rank, backend="nccl"
        )
        arguments = xfuser_arguments(params, ctx.width, ctx.height, ctx.generate)
        engine_config, input_config = xFuserArgs(model="", **arguments).create_config()
        # xfuser's runtime dtype defaults to float16; the model was loaded in the recipe's dtype.
        if ctx.dtype is not None:
            engine_config.runtime_config.dtype = ctx.dtype
        self.engine = xDiTParallel(pipe, engine_config, input_config)
        route_calls_through(pipe, self.engine)
        detail = params.degree_formula() + f" ranks; {params.ranks_per_image} per image"
        ignored = ignored_environment(params)
        if ignored:
            detail += f"; ignored from the environment: {', '.join(ignored)}"
        return detail


def route_calls_through(pipe: Any, engine: Callable[..., Any]) -> None:
    """Make `pipe(...)` run through `engine`, while the engine's own calls into the pipeline reach its code.

    The pipeline gets a class of its own (other pipelines of its class in this process stay as they are)
    whose `__call__` hands the call to the engine, unless the engine is already inside it (xDiT calls the
    pipeline directly when a group does not split the work). The pipeline keeps the engine alive: xDiT
    tears down its process groups when its wrapper is collected.
    """
    cls = type(pipe)
    original = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._dgrun_engine_active:
            return original(self, *args, **kwargs)
        self._dgrun_engine_active = True
        try:
            return self._dgrun_engine(*args, **kwargs)
        finally:
            self._dgrun_engine_active = False

    namespace = {"__module__": cls.__module__, "__doc__": cls.__doc__, "__call__": __call__}
    pipe.__class__ = type(cls.__name__, (cls,), namespace)
    pipe._dgrun_engine = engine
    pipe._dgrun_engine_active = False


def recipe_entry(environ: Mapping[str, str] | None = None) -> str:
    """The `optimize:` entry equivalent to the DG_XDIT_* variables (validated), as one YAML flow line."""
    params = params_from_environment(environ)
    try:
        XditParams(**params)
    except ValidationError as exc:
        messages = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise UsageError(f"DG_XDIT_* settings: {messages}") from None
    body = ", ".join(f"{name}: {str(value).lower()}" for name, value in params.items())
    return f"- xdit: {{{body}}}"


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(Xdit)
