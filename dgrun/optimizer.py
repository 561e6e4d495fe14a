"""The optimizer API that built-in steps and third-party plugins implement.

An optimizer is a class: a step name, a pydantic params model, the stage it runs in, and the rules the
planner enforces before any model is loaded (conflicts, order, model kind, packages, device kind). Rules
name other steps, or a tag with a leading `#` ("#cache" = every step tagged "cache"), so a plugin's new
cache automatically conflicts with the built-in ones.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class ModelKind(str, Enum):
    """Which denoiser a pipeline has; many optimizations only work on one of them."""

    UNET = "unet"
    TRANSFORMER = "transformer"


class Stage(str, Enum):
    """When a step runs: process settings before load, load-time changes, then modules in recipe order."""

    PROCESS = "process"
    LOAD = "load"
    PIPELINE = "pipeline"


STAGE_ORDER = {Stage.PROCESS: 0, Stage.LOAD: 1, Stage.PIPELINE: 2}

# Tags with a meaning to the built-in rules.
TAG_CACHE = "cache"
TAG_REWRITES_MODULES = "rewrites_modules"
TAG_ATTENTION = "attention"
TAG_OFFLOAD = "offload"
TAG_PARALLEL = "parallel"  # splits each image's work over the ranks of a launch
# Decides in Python, at every denoising step, which parts of the model run (DeepCache): a whole-model
# torch.compile guards on that state and recompiles each step until dynamo gives up.
TAG_PER_STEP_PYTHON = "per_step_python"
# Changes how weights are stored or which layers hold them (quantize, fuse_qkv, layerwise_casting, ...).
TAG_CHANGES_WEIGHTS = "changes_weights"
# The tags built-in rules use, with what each implies (docs/plugins.md says the same for authors).
BUILTIN_TAGS = {
    TAG_CACHE: "one cache at a time; caches come after fuse_qkv; compile with CUDA graphs refuses them",
    TAG_REWRITES_MODULES: "replaces modules or wraps forward: `compile` comes after it",
    TAG_ATTENTION: "chooses attention kernels: `xformers` and xDiT exclude it",
    TAG_OFFLOAD: "moves weights between devices: offloads exclude each other and model parallelism",
    TAG_PARALLEL: "splits each image over the ranks of a launch: one per recipe",
    TAG_PER_STEP_PYTHON: "decides in Python at each step what runs: whole-model `compile` is refused",
    TAG_CHANGES_WEIGHTS: "changes how weights are stored: offloads and xDiT come after it",
}


class StepParams(BaseModel):
    """Base for step params: closed and strict like the rest of the recipe."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Names of pipeline components a step works on (`unet`, `text_encoder_2`, ...): plain attribute names only,
# checked against the model's components by the planner when they are known before loading.
ComponentName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
ComponentNames = Annotated[list[ComponentName], Field(min_length=1, max_length=32)]


class NoParams(StepParams):
    """For steps that take no parameters."""


@dataclass
class Environment:
    """What the planner knows about the machine. `probed` is False for `dgrun check` (no torch import)."""

    device: str
    device_kind: str
    cuda_capability: tuple[int, int] | None = None
    probed: bool = False

    @classmethod
    def guess(cls, device: str = "auto") -> Environment:
        """Cheap guess without importing torch: an NVIDIA device node means CUDA is probably usable."""
        if device == "auto":
            device = "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"
        return cls(device=device, device_kind=device.split(":")[0], probed=False)

    @classmethod
    def probe(cls, device: str = "auto") -> Environment:
        """Ask torch which device is there (run time)."""
        import torch

        if device == "auto":
            if torch.cuda.is_available():
                device = "cuda"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                device = "mps"
            else:
                device = "cpu"
        kind = device.split(":")[0]
        capability = None
        if kind == "cuda" and torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability(torch.device(device)))
        return cls(device=device, device_kind=kind, cuda_capability=capability, probed=True)

    @staticmethod
    def has_package(import_name: str) -> bool:
        """Whether a package can be imported, without importing it."""
        try:
            return importlib.util.find_spec(import_name) is not None
        except (ImportError, ValueError):
            return False


@dataclass
class ApplyContext:
    """What `apply` gets besides the pipeline: the environment, the model's kind and dtype.

    `generate` is the recipe's `generate` section (steps, batch size, guidance) for steps that must size
    themselves to the calls to come, e.g. a parallel engine's warm-up; None outside a run.
    """

    env: Environment
    model_kind: ModelKind | None
    dtype: Any = None
    width: int | None = None
    height: int | None = None
    generate: Any = None


@dataclass
class StepResult:
    """What `apply` may return instead of a plain detail string: e.g. `StepResult("fell back", "native")`."""

    status: str
    detail: str | None = None


@dataclass
class PlanView:
    """What a step's `combination_problem` may look at: the other planned steps, the recipe, the class."""

    steps: list[tuple[type[Optimizer], StepParams]]
    recipe: Any = None  # dgrun.recipe.Recipe, None outside a recipe
    pipeline_class: str | None = None  # None when it is known only once loaded (hub ids)

    def named(self, rule: str) -> list[str]:
        """Names of the planned steps a rule (a step name, or a tag without `#`) refers to."""
        return [cls.name for cls, _ in self.steps if cls.name == rule or rule in cls.tags]

    def params_of(self, name: str) -> StepParams | None:
        return next((params for cls, params in self.steps if cls.name == name), None)


@dataclass
class StepEffect:
    """What a step measurably did during a run, read from counters once the images are made.

    `counters` go into the record as they are; `summary` is one line for people. `no_effect` says why the
    counters show nothing happened (the step is then recorded as `no effect`); `warning` flags an effect
    that hurts (e.g. a recompile storm), printed once and listed in the record's `warnings`.
    """

    counters: dict[str, Any]
    summary: str
    no_effect: str | None = None
    warning: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            **self.counters,
            "summary": self.summary,
            "no_effect": self.no_effect,
            "warning": self.warning,
        }


P = TypeVar("P", bound=StepParams)


class Optimizer(Generic[P]):
    """Base class of every optimization step. Subclasses set the class attributes and `apply`.

    Generic in its params model: `class MyStep(Optimizer[MyParams])` with `Params = MyParams` gives
    `self.params` the type `MyParams`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StepParams]] = NoParams
    stage: ClassVar[Stage] = Stage.PIPELINE
    tags: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()
    # Why a conflict rule exists, by rule (a step name or `#tag`): shown with the planner's error.
    conflict_reasons: ClassVar[dict[str, str]] = {}
    after: ClassVar[frozenset[str]] = frozenset()  # steps/tags this step must come after
    before: ClassVar[frozenset[str]] = frozenset()  # steps/tags this step must come before
    applies_to: ClassVar[frozenset[ModelKind]] = frozenset(ModelKind)
    requires_packages: ClassVar[tuple[str, ...]] = ()
    requires_devices: ClassVar[frozenset[str]] = frozenset()
    # Offloading steps place modules on the device themselves: the runner then loads on the CPU.
    places_modules: ClassVar[bool] = False

    def __init__(self, params: P):
        self.params: P = params

    # The runner's side of model parallelism: how many ranks make each image together (the runner shards
    # prompts over the rest), and which rank of such a group ends up holding the images (it writes them).
    @property
    def ranks_per_image(self) -> int:
        return 1

    @property
    def image_rank_in_group(self) -> int:
        return 0

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        """Why this step cannot run here (None: it can). Overrides add checks such as compute capability."""
        missing = [p for p in cls.requires_packages if not env.has_package(p)]
        if missing:
            return f"needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)} (not installed)"
        if cls.requires_devices and env.device_kind not in cls.requires_devices:
            wanted = " or ".join(sorted(cls.requires_devices)).upper()
            return f"needs a {wanted} device; this run uses {env.device_kind}"
        return None

    @classmethod
    def pipeline_problem(cls, pipeline_class: str) -> str | None:
        """Why this step cannot work on a pipeline of this class, or None.

        Asked before loading when the class is known (built-in models, a local model_index.json), and again
        with the loaded pipeline's class, so `dgrun check` refuses what `run` would fail on.
        """
        return None

    @classmethod
    def combination_problem(cls, params: StepParams, plan: PlanView) -> str | None:
        """Why this step, with these params, cannot work beside the other planned steps or with the recipe's
        settings (rules that depend on parameters), or None. Checked by the planner before loading."""
        return None

    @classmethod
    def process_environment(cls, params: StepParams) -> dict[str, str]:
        """Environment variables a process-stage step needs before torch first touches the device (e.g. the
        CUDA allocator's config, read once): the runner sets them before it probes the GPU."""
        return {}

    def load_kwargs(self, ctx: ApplyContext) -> dict[str, Any]:
        """Keyword arguments a load-stage step adds to the pipeline's `from_pretrained`."""
        return {}

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | StepResult | None:
        """Change the pipeline (None for process-stage steps).

        Return a detail for the record (status "applied"), or a StepResult to record a fallback.
        """
        raise NotImplementedError

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """The first pipeline call failed after this step: undo it if that can help, saying what it did.

        Return None when the failure is not this step's (the runner then asks the step before it).
        """
        return None

    def effect(self, pipe: Any) -> StepEffect | None:
        """What the step did during the run, from counters it set up in `apply` (None: nothing measured)."""
        return None

    def undo(self) -> None:
        """Put back process-wide state the step changed (torch flags, the attention backend, allocator
        settings), so the next pipeline in this process starts clean; `dgrun bench` calls it between
        variants. Changes confined to this step's pipeline need no undo: the pipeline is dropped."""


def matches(rule: str, optimizer: type[Optimizer]) -> bool:
    """Whether a rule entry (a step name or `#tag`) refers to `optimizer`."""
    if rule.startswith("#"):
        return rule[1:] in optimizer.tags
    return rule == optimizer.name
