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
from typing import Annotated, Any, ClassVar

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


class Optimizer:
    """Base class of every optimization step. Subclasses set the class attributes and `apply`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StepParams]] = NoParams
    stage: ClassVar[Stage] = Stage.PIPELINE
    tags: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[frozenset[str]] = frozenset()
    applies_to: ClassVar[frozenset[ModelKind]] = frozenset(ModelKind)
    requires_packages: ClassVar[tuple[str, ...]] = ()
    requires_devices: ClassVar[frozenset[str]] = frozenset()
    # Offloading steps place modules on the device themselves: the runner then loads on the CPU.
    places_modules: ClassVar[bool] = False

    def __init__(self, params: StepParams):
        self.params = params

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

    def load_kwargs(self, ctx: ApplyContext) -> dict[str, Any]:
        """Keyword arguments a load-stage step adds to the pipeline's `from_pretrained`."""
        return {}

    def apply(self, pipe: Any, ctx: ApplyContext) -> str | StepResult | None:
        """Change the pipeline (None for process-stage steps).

        Return a detail for the record (status "applied"), or a StepResult to record a fallback.
        """
        raise NotImplementedError

    def recover(self, pipe: Any, error: BaseException) -> str | None:
        """The first pipeline call failed after this step: undo it if that can help, saying what it did."""
        return None


def matches(rule: str, optimizer: type[Optimizer]) -> bool:
    """Whether a rule entry (a step name or `#tag`) refers to `optimizer`."""
    if rule.startswith("#"):
        return rule[1:] in optimizer.tags
    return rule == optimizer.name
