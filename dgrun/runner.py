"""Run a recipe: plan, load once, apply the steps, warm up, generate, record (docs/recipes.md).

The runner never prints: it reports through a `RunObserver` (the CLI's shows rich progress). The run
record is written when the run starts, after every batch, and on failure or Ctrl-C, always atomically,
so an interrupted run can be resumed and never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dgrun import __version__
from dgrun.applying import (
    apply_step,
    collect_effects,
    export_process_environment,
    load_planned,
    recover_steps,
)
from dgrun.distributed import Distributed, RankTerminated, merge_rank_reports, shard, verdict
from dgrun.errors import (
    DgrunError,
    OutputWriteError,
    RunError,
    Terminated,
)
from dgrun.generation import batches, call_kwargs
from dgrun.gitinfo import git_state
from dgrun.loading import LoadedRecipe
from dgrun.lock import OutputLock, is_out_of_space
from dgrun.machine import runtime_facts
from dgrun.models import native_size, resolve_dtype
from dgrun.optimizer import ApplyContext, Environment, Stage
from dgrun.outputs import ImageJob, Previous, claim_output_dir, image_jobs, resolve_output_dir
from dgrun.planner import Plan, PlannedStep, plan_recipe
from dgrun.plugins import Registry
from dgrun.quiet import quiet_libraries
from dgrun.records import (
    package_versions,
    peak_memory,
    write_png,
)
from dgrun.runrecord import RECORD_FILE, ModelInfo, PluginEntry, RunRecord, TrustRemoteCode

MEMORY_HINT = (
    "out of memory: try the memory steps (vae_slicing, vae_tiling, cpu_offload, group_offloading), "
    "a smaller batch_size, or a smaller image"
)


@dataclass
class RunOptions:
    """Command-line choices that are not part of the recipe."""

    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    argv: list[str] = field(default_factory=list)
    # Read the recipe's git commit (from .git, never by running git): only for a recipe the user named,
    # not for one taken from a record, whose recorded paths are untrusted.
    record_git: bool = True
    threads: int | None = None  # CPU threads when the recipe sets none (reproduce: the recorded count)
    wait_policy: str | None = None  # what the CLI chose for OpenMP's idle threads, for the record
    only: set[tuple[int, int]] | None = None  # (prompt, image) to remake, with the rest of their batch


class RunObserver:
    """Progress callbacks; the default does nothing (tests, library use)."""

    def stage(self, message: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def step_done(self, step: PlannedStep) -> None: ...

    def generation_started(self, total: int, already_done: int) -> None: ...

    def image_done(self, image: dict[str, Any]) -> None: ...


class Run:
    """One execution of a recipe into one output directory."""

    def __init__(self, loaded: LoadedRecipe, registry: Registry, options: RunOptions, observer: RunObserver):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.registry = registry
        self.options = options
        self.observer = observer
        self.sha = self.recipe.sha256()
        self.out_dir = resolve_output_dir(self.recipe, options.out)
        self.jobs = image_jobs(self.recipe)
        self.record: RunRecord | None = None
        self.plan: Plan | None = None
        self.pipe: Any = None
        self.first_call_done = False
        # Data parallel (dgrun.distributed): this rank's place in a torchrun / accelerate launch.
        self.dist = Distributed.from_env()
        self.made: list[dict[str, Any]] = []
        self.writes_images = True
        self.lock: OutputLock | None = None
        self.effects_collected = False
        self.restore_threads: int | None = None
        self.exported_env: dict[str, str | None] = {}  # process_environment variables, and their old values

    # ----------------------------------------------------------------------------------------- setup
    def prepare(self) -> Previous:
        """Everything that can fail on bad input, before any model is loaded or file written."""
        self.exported_env = export_process_environment(self.recipe.optimize, self.registry)
        device = self.dist.device(self.recipe.model.device)
        self.plan = plan_recipe(self.loaded, self.registry, Environment.probe(device))
        if self.plan.env.device_kind == "cuda" and ":" in self.plan.env.device:
            import torch

            # cuda:N in one process: peak memory, bitsandbytes placement and new tensors follow device N.
            torch.cuda.set_device(self.plan.env.device)
        self.dist.start(self.plan.env.device_kind)
        # Only rank 0 looks at (and may clean) the output directory; every rank gets its verdict.
        return verdict(self.dist, self._check_output)

    def _check_output(self) -> Previous:
        """Lock the output directory, then decide what an earlier run there left (rank 0 only)."""
        assert self.plan is not None
        blocking = self.plan.blocking()
        if blocking:
            lines = [f"step {s.name!r} cannot run here: {s.reason}" for s in blocking]
            lines.append(
                "give the step `on_unavailable: skip` (or the recipe `on_unavailable: skip`) to skip it"
            )
            raise RunError("\n".join(lines))
        self.lock, previous = claim_output_dir(
            self.out_dir,
            self.sha,
            self.options.overwrite,
            self.options.resume,
            self.options.argv,
            len(self.jobs),
        )
        return previous

    def start_record(self) -> None:
        assert self.plan is not None
        recipe_flag = self.recipe.model.trust_remote_code
        self.record = RunRecord(
            dgrun=__version__,
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=self.options.argv,
            recipe_file=str(self.loaded.path),
            git=git_state(self.loaded.path) if self.options.record_git else None,
            recipe=self.recipe.resolved(),
            recipe_sha256=self.sha,
            versions=package_versions(self.plugin_versions()),
            plugins=[
                PluginEntry(name=p.name, distribution=p.distribution, version=p.version, error=p.error)
                for p in self.registry.plugins
            ],
            device=self.plan.env.device,
            world_size=self.dist.world_size,
            model=ModelInfo(id=self.recipe.model.id),
            trust_remote_code=TrustRemoteCode(
                recipe=recipe_flag,
                command_line=self.options.trust_remote_code,
                effective=recipe_flag and self.options.trust_remote_code,
            ),
            plan=[s.record() for s in self.plan.steps],
        )

    def plugin_versions(self) -> dict[str, str]:
        return {
            p.distribution: p.version
            for p in self.registry.plugins
            if p.distribution != "dgrun" and p.version
        }

    def save(self) -> None:
        """Write run.json; on a full disk, once more with the space the lock reserved for this moment."""
        if not self.dist.is_main:
            return  # rank 0 alone writes run.json, merging the other ranks' images at the end
        assert self.record is not None
        if self.plan is not None:
            self.record.plan = [s.record() for s in self.plan.steps]
        try:
            self.record.write(self.out_dir)
        except OSError as exc:
            if not (is_out_of_space(exc) and self.lock is not None and self.lock.release_reserve()):
                raise OutputWriteError(RECORD_FILE, self.out_dir, exc) from exc
            try:
                self.record.write(self.out_dir)
            except OSError as again:
                raise OutputWriteError(RECORD_FILE, self.out_dir, again) from again

    # ------------------------------------------------------------------------------------------- run
    def execute(self) -> dict[str, Any]:
        try:
            return self._execute()
        finally:
            if self.restore_threads:
                import torch

                torch.set_num_threads(self.restore_threads)
                self.restore_threads = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self.dist.close()

    def _execute(self) -> dict[str, Any]:
        previous = self.prepare()
        self.start_record()
        self.save()
        try:
            self._run(previous)
        except RankTerminated as exc:
            self._finish("failed", str(exc), gather=False)
            raise
        except KeyboardInterrupt as exc:
            how = (
                "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted by the user (Ctrl-C)"
            )
            self._finish("interrupted", f"{how}; `--resume` finishes the run")
            raise
        except DgrunError as exc:
            self._finish("failed", str(exc))
            raise
        except Exception as exc:
            message = self._describe(exc)
            self._finish("failed", message)
            raise RunError(message) from exc
        self._finish("complete", None)
        if self.record.status != "complete":  # another rank failed: every rank fails alike
            raise RunError(self.record.error or "another rank failed")
        return self.record.as_dict()

    def _describe(self, exc: BaseException) -> str:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return MEMORY_HINT + f" ({str(exc).splitlines()[0] if str(exc) else 'OutOfMemoryError'})"
        return f"{type(exc).__name__}: {exc}"

    def _finish(self, status: str, error: str | None, gather: bool = True) -> None:
        if self.pipe is not None and status != "complete":
            with contextlib.suppress(Exception):
                self.collect_effects()  # what the steps did before the run stopped
        if self.dist.active:
            status, error = self._merge_ranks(status, error, gather)
        self.record.status = status
        self.record.error = error
        self.record.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.plan is not None:
            with contextlib.suppress(Exception):
                self.record.peak_memory = peak_memory(self.plan.env.device_kind)
        self.save()

    def _run(self, previous: Previous) -> None:
        import torch

        assert self.plan is not None
        quiet_libraries()
        env = self.plan.env
        threads = self.recipe.generate.threads or self.options.threads
        if threads and threads != torch.get_num_threads():
            self.restore_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.record.runtime = runtime_facts(env.device, self.options.wait_policy)
        dtype = resolve_dtype(self.recipe.model.dtype, env.device_kind)
        self.record.dtype = str(dtype).removeprefix("torch.")
        ctx = ApplyContext(
            env=env, model_kind=self.plan.model_kind, dtype=dtype, generate=self.recipe.generate
        )

        started = time.perf_counter()
        for step in self.plan.ordered():
            if step.stage is Stage.PROCESS:
                self._apply(step, None, ctx)
        self.observer.stage(f"loading {self.recipe.model.id}")
        load_started = time.perf_counter()
        self.pipe = self._load(ctx, dtype)
        self.record.timings.load_seconds = round(time.perf_counter() - load_started, 4)

        apply_started = time.perf_counter()
        width, height = native_size(self.pipe, self.recipe.model.id)
        ctx.width = self.recipe.generate.width or width
        ctx.height = self.recipe.generate.height or height
        for step in self.plan.ordered():
            if step.stage is not Stage.PROCESS:
                self._apply(step, self.pipe, ctx)
        self.record.timings.apply_seconds = round(time.perf_counter() - apply_started, 4)
        self.save()

        # Ranks that make each image together (context_parallel, xdit) share one shard; the rank that
        # ends up holding the images (`image_rank_in_group`, the group's first unless a step says) writes.
        applied = [s.optimizer for s in self.plan.steps if s.status == "applied"]
        group = max([o.ranks_per_image for o in applied if o is not None], default=1)
        writer = max([o.image_rank_in_group for o in applied if o is not None], default=0)
        self.writes_images = self.dist.rank % group == writer
        dp_rank, dp_world = self.dist.rank // group, self.dist.world_size // group
        mine = shard(self.jobs, lambda job: job.prompt_index, dp_rank, dp_world)
        if self.options.only is not None:  # reproduce one image: remake the call that made it
            wanted = self.options.only
            mine = [
                j
                for b in self._batches(mine)
                if any((k.prompt_index, k.image_index) in wanted for k in b)
                for j in b
            ]
        todo = [job for job in mine if job.file not in previous.done]
        self.record.images = [previous.done[job.file] for job in self.jobs if job.file in previous.done]
        if self.dist.active:
            self.observer.stage(
                f"data parallel: rank {self.dist.rank} of {self.dist.world_size} makes "
                f"{len(mine)} of {len(self.jobs)} images"
            )
        with torch.inference_mode():
            warmup_started = time.perf_counter()
            for index in range(self.recipe.generate.warmup):
                self.observer.stage(f"warmup call {index + 1} of {self.recipe.generate.warmup}")
                self._call(self._batches(self.jobs)[0])
            self.record.timings.warmup_seconds = round(time.perf_counter() - warmup_started, 4)
            self.observer.generation_started(len(mine), len(mine) - len(todo))
            for batch in self._batches(todo):
                self._generate(batch)
        self.record.timings.total_seconds = round(time.perf_counter() - started, 4)
        self.collect_effects()

    def collect_effects(self) -> None:
        """Ask every applied step what it measurably did; `no effect` and warnings go into the record."""
        if self.plan is None or self.effects_collected:
            return
        self.effects_collected = True
        for warning in collect_effects(self.plan, self.pipe):
            self.warn(warning)

    def undo_steps(self) -> None:
        """Let every step put back the process-wide state it changed (bench, between entries)."""
        for step in reversed(self.plan.ordered() if self.plan is not None else []):
            if step.optimizer is not None:
                with contextlib.suppress(Exception):
                    step.optimizer.undo()
        for key, value in self.exported_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.exported_env.clear()

    def warn(self, message: str) -> None:
        """A warning a user must know: printed once, kept in the record."""
        if message not in self.record.warnings:
            self.record.warnings.append(message)
            self.observer.warning(message)

    def _load(self, ctx: ApplyContext, dtype: Any) -> Any:
        assert self.plan is not None
        trust = self.recipe.model.trust_remote_code and self.options.trust_remote_code
        pipe = load_planned(self.loaded, self.plan, self.registry, ctx, dtype, trust)
        kind = self.plan.model_kind
        self.record.model.kind = kind.value if kind else None
        self.record.model.pipeline_class = type(pipe).__name__
        return pipe

    def _apply(self, step: PlannedStep, pipe: Any, ctx: ApplyContext) -> None:
        try:
            apply_step(step, pipe, ctx)
        finally:
            if step.status != "planned":
                self.observer.step_done(step)

    # ------------------------------------------------------------------------------------ generation
    def _batches(self, jobs: list[ImageJob]) -> list[list[ImageJob]]:
        return batches(jobs, self.recipe.generate.batch_size)

    def _call(self, batch: list[ImageJob]) -> list[Any]:
        """One pipeline call; the first one may trigger compilation, so failures there can be recovered."""
        if self.first_call_done:
            return self._pipeline_call(batch)
        started = time.perf_counter()
        try:
            images = self._pipeline_call(batch)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if not self._recover(exc):
                raise
            images = self._pipeline_call(batch)
        self.first_call_done = True
        self.record.timings.first_call_seconds = round(time.perf_counter() - started, 4)
        return images

    @property
    def calls_per_pass(self) -> int:
        """Pipeline calls in one pass over every image."""
        return len(self._batches(self.jobs))

    def timed_pass(self, stop: Any = None) -> list[tuple[int, float]]:
        """Generate every image again, writing nothing: (images, seconds) per pipeline call.

        `dgrun bench` times its repeats with this after `execute`, so they use the run's own pipeline,
        batches and call arguments. `stop(calls)`, asked after each call, ends the pass early when true
        (`dgrun tune` stops a trial that is already slower than the best one).
        """
        import torch

        calls: list[tuple[int, float]] = []
        with torch.inference_mode():
            for batch in self._batches(self.jobs):
                started = time.perf_counter()
                self._call(batch)
                calls.append((len(batch), time.perf_counter() - started))
                if stop is not None and stop(calls):
                    break
        return calls

    def _recover(self, exc: BaseException) -> bool:
        assert self.plan is not None
        messages = recover_steps(self.plan, self.pipe, exc)
        for message in messages:
            self.observer.warning(message)
        return bool(messages)

    def _pipeline_call(self, batch: list[ImageJob]) -> list[Any]:

        output = self.pipe(**call_kwargs(self.recipe.generate, batch))
        # In a model-parallel group only the writing rank gets images back (xDiT returns None elsewhere).
        return list(output.images) if self.writes_images else []

    def _generate(self, batch: list[ImageJob]) -> None:
        started = time.perf_counter()
        images = self._call(batch)
        seconds = (time.perf_counter() - started) / len(batch)
        if not self.writes_images:
            return
        versions = self.record.versions
        runtime = self.record.runtime or {}
        for job, image in zip(batch, images, strict=True):
            info = {
                "recipe": self.record.recipe,
                "recipe_sha256": self.sha,
                "prompt": job.prompt.text,
                "negative": job.prompt.negative
                if job.prompt.negative is not None
                else self.recipe.generate.negative_prompt,
                "seed": job.seed,
                "prompt_index": job.prompt_index,
                "image_index": job.image_index,
                "versions": versions,
                "runtime": {k: runtime.get(k) for k in ("threads", "cpu_capability")},
            }
            try:
                digest = write_png(self.out_dir / job.file, image, info)
            except OSError as exc:
                if is_out_of_space(exc) and self.lock is not None:
                    self.lock.release_reserve()  # so the final run.json fits
                raise OutputWriteError(job.file, self.out_dir, exc) from exc
            entry = {
                "file": job.file,
                "prompt_index": job.prompt_index,
                "image_index": job.image_index,
                "prompt_id": job.prompt.id,
                "prompt": job.prompt.text,
                "seed": job.seed,
                "width": image.width,
                "height": image.height,
                "sha256": digest,
                "seconds": round(seconds, 4),
                "rank": self.dist.rank,
            }
            self.made.append(entry)
            self.record.images.append(entry)
            self.observer.image_done(entry)
        self.record.images.sort(key=lambda e: (e["prompt_index"], e["image_index"]))
        self.save()

    # ------------------------------------------------------------------------------ data parallel
    def _merge_ranks(self, status: str, error: str | None, gather: bool) -> tuple[str, str | None]:
        """Collect every rank's images and outcome; the run is complete only if every rank completed."""
        assert self.plan is not None
        mine = {"rank": self.dist.rank, "device": self.plan.env.device, "status": status, "error": error}
        merged = merge_rank_reports(self.dist, mine, self.made, self.record.images, gather)
        self.record.images, self.record.ranks, status, error = merged
        return status, error


def run_recipe(
    loaded: LoadedRecipe, registry: Registry, options: RunOptions, observer: RunObserver | None = None
) -> dict[str, Any]:
    """Run a loaded recipe and return its record.

    Raises RecipeError, UsageError, RunError or KeyboardInterrupt; the record on disk says which.
    """
    run = Run(loaded, registry, options, observer or RunObserver())
    return run.execute()
