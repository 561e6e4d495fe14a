"""One warm pipeline: the recipe loaded, its steps applied and warmed up, making images for requests.

The engine is what a server worker holds (a local worker process, or a Ray Serve replica). It plans and
applies the recipe exactly as `dgrun run` does (the same planner, loader and steps) and builds each call
with the same `call_kwargs`, so a request for a prompt and seed, served unbatched with the same thread
count, gives the same pixels as `dgrun run` of that prompt and seed.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dgrun.applying import (
    apply_step,
    collect_effects,
    export_process_environment,
    load_planned,
    recover_steps,
)
from dgrun.errors import RunError
from dgrun.generation import call_kwargs
from dgrun.loading import LoadedRecipe
from dgrun.optimizer import ApplyContext, Environment, Stage
from dgrun.outputs import ImageJob
from dgrun.planner import Plan, plan_recipe
from dgrun.plugins import Registry
from dgrun.recipe import PromptSpec, recipe_hash
from dgrun.records import PNG_CHUNK, package_versions, png_metadata

MAX_IMAGES_PER_REQUEST = 8


@dataclass(frozen=True)
class ImageRequest:
    """One request as a worker sees it: already validated by the API."""

    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def batch_key(self) -> tuple[int, int | None, int | None]:
        """Requests with the same key can share one pipeline call."""
        return (self.n, self.width, self.height)


@dataclass
class GeneratedImage:
    """One image made for a request: PNG bytes with dgrun's chunk, and what made it."""

    png: bytes
    seed: int
    width: int
    height: int


@dataclass
class BatchResult:
    """What one pipeline call made: images per request (in request order) and its seconds."""

    images: list[list[GeneratedImage]]
    seconds: float
    batch_size: int = 0
    warnings: list[str] = field(default_factory=list)


class Engine:
    """Loads, applies and warms the recipe once; then makes images for batches of requests."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        registry: Registry,
        device: str | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.registry = registry
        self.device = device or self.recipe.model.device
        self.threads = threads
        self.trust_remote_code = trust_remote_code
        self.plan: Plan | None = None
        self.pipe: Any = None
        self.first_call_done = False
        self.versions: dict[str, str] = {}
        self.warnings: list[str] = []
        self.runtime: dict[str, Any] = {}

    def start(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Plan, load, apply and warm up (at least one call, `generate.warmup` if more)."""
        import torch

        from dgrun.machine import runtime_facts
        from dgrun.models import native_size, resolve_dtype
        from dgrun.quiet import quiet_libraries

        threads = self.recipe.generate.threads or self.threads
        if threads:
            torch.set_num_threads(threads)
        export_process_environment(self.recipe.optimize, self.registry)
        self.plan = plan = plan_recipe(self.loaded, self.registry, Environment.probe(self.device))
        blocking = plan.blocking()
        if blocking:
            raise RunError("; ".join(f"step {s.name!r} cannot run here: {s.reason}" for s in blocking))
        quiet_libraries()
        env = plan.env
        dtype = resolve_dtype(self.recipe.model.dtype, env.device_kind)
        ctx = ApplyContext(env=env, model_kind=plan.model_kind, dtype=dtype, generate=self.recipe.generate)
        for step in plan.ordered():
            if step.stage is Stage.PROCESS:
                apply_step(step, None, ctx)
        progress(f"loading {self.recipe.model.id}")
        trust = self.recipe.model.trust_remote_code and self.trust_remote_code
        self.pipe = load_planned(self.loaded, plan, self.registry, ctx, dtype, trust)
        ctx.width, ctx.height = native_size(self.pipe, self.recipe.model.id)
        progress("applying steps")
        for step in plan.ordered():
            if step.stage is not Stage.PROCESS:
                apply_step(step, self.pipe, ctx)
        self.versions = package_versions()
        self.runtime = runtime_facts(env.device)
        calls = max(1, self.recipe.generate.warmup)
        for number in range(calls):
            progress(f"warming up ({number + 1} of {calls}; compiling if the recipe compiles)")
            self.generate([ImageRequest(self.recipe.prompts[0].text, self.recipe.generate.seed)])

    def plan_record(self) -> list[dict[str, Any]]:
        """The plan as run.json records it, with the steps' effects so far."""
        if self.plan is None:
            return []
        self.warnings = collect_effects(self.plan, self.pipe) if self.pipe is not None else []
        return [step.record().model_dump(mode="json") for step in self.plan.steps]

    def generate(self, requests: list[ImageRequest]) -> BatchResult:
        """One pipeline call for requests sharing a batch key; each request keeps its own seed."""
        import torch

        first = requests[0]
        generate = self.recipe.generate.model_copy(
            update={
                "images_per_prompt": first.n,
                "width": first.width or self.recipe.generate.width,
                "height": first.height or self.recipe.generate.height,
            }
        )
        jobs = [
            ImageJob(
                0,
                index,
                image,
                PromptSpec(text=r.prompt, seed=r.seed, negative=r.negative_prompt),
                r.seed,
                "",
            )
            for index, r in enumerate(requests)
            for image in range(r.n)
        ]
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._call(call_kwargs(generate, jobs))
        seconds = time.perf_counter() - started
        images = list(output.images)
        results: list[list[GeneratedImage]] = [[] for _ in requests]
        for job, image in zip(jobs, images, strict=True):
            request = requests[job.prompt_index]
            results[job.prompt_index].append(
                GeneratedImage(
                    self._png(image, request, job.image_index, generate), request.seed, *image.size
                )
            )
        return BatchResult(results, seconds, len(requests))

    def _call(self, kwargs: dict[str, Any]) -> Any:
        if self.first_call_done:
            return self.pipe(**kwargs)
        assert self.plan is not None
        try:
            output = self.pipe(**kwargs)
        except Exception as exc:
            if not recover_steps(self.plan, self.pipe, exc):
                raise
            output = self.pipe(**kwargs)
        self.first_call_done = True
        return output

    def _png(self, image: Any, request: ImageRequest, image_index: int, generate: Any) -> bytes:
        """The image as a PNG whose dgrun chunk is a one-prompt recipe: `dgrun reproduce` remakes it."""
        from PIL.PngImagePlugin import PngInfo

        recipe = self.recipe.resolved()
        recipe["prompts"] = [
            {"text": request.prompt, "id": None, "seed": request.seed, "negative": request.negative_prompt}
        ]
        recipe["generate"] = {**recipe["generate"], "images_per_prompt": generate.images_per_prompt}
        if request.width or request.height:
            recipe["generate"]["width"], recipe["generate"]["height"] = generate.width, generate.height
        recipe["variants"] = []
        info = {
            "recipe": recipe,
            "recipe_sha256": recipe_hash(recipe),
            "prompt": request.prompt,
            "negative": request.negative_prompt,
            "seed": request.seed,
            "prompt_index": 0,
            "image_index": image_index,
            "versions": self.versions,
            "runtime": {k: self.runtime.get(k) for k in ("threads", "cpu_capability")},
        }
        chunk = PngInfo()
        chunk.add_text(PNG_CHUNK, png_metadata(info))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=chunk)
        return buffer.getvalue()
