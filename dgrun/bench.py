"""`dgrun bench`: the baseline, the recipe and every variant, each a fresh run, timed and compared.

Every entry is an ordinary run (`Run`, so loading and applying are exactly what `dgrun run` does) into
`OUT/variants/NAME/` with its own run.json and PNGs, so any of them can be reproduced on its own. After
the run writes its images, the same pipeline is called `warmup` more times untimed and `repeats` times
timed. The pipeline is then dropped (and torch.compile's caches reset), so the next entry loads afresh and
inherits no hook, patched forward or compiled graph.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgrun import __version__
from dgrun.errors import DgrunError, Problem, RecipeError, RunError, UsageError
from dgrun.gitinfo import git_state
from dgrun.loading import LoadedRecipe
from dgrun.lock import OutputLock
from dgrun.metrics import PeakMemory, adherence, compare, fidelity_summary, latency_summary, lpips_status
from dgrun.outputs import resolve_output_dir
from dgrun.plugins import Registry
from dgrun.records import package_versions, read_json, write_json
from dgrun.runner import Run, RunObserver, RunOptions
from dgrun.variants import BASELINE, expand_variants, member_name_problems, variant_recipe

REPORT_KIND = "dgrun-bench"
REPORT_SCHEMA = 1
REPORT_FILE = "report.json"


@dataclass
class BenchOptions:
    """Command-line choices of `dgrun bench`."""

    repeats: int = 3
    warmup: int = 1
    out: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    argv: list[str] = field(default_factory=list)
    wait_policy: str | None = None


class BenchObserver(RunObserver):
    """Run callbacks (for the entry running now) plus bench progress; the default does nothing."""

    def variant_started(self, result: dict[str, Any]) -> None: ...

    def variant_done(self, result: dict[str, Any]) -> None: ...

    def pipeline_ready(self, result: dict[str, Any], pipe: Any) -> None:
        """After an entry's run, before its pipeline is dropped (tests inspect it for leftover state)."""


@dataclass
class Entry:
    """One column of the comparison: its recipe, its run, and its result record."""

    name: str
    role: str  # baseline | recipe | variant
    loaded: LoadedRecipe
    result: dict[str, Any]
    run: Run | None = None
    device_kind: str = "cpu"


def default_out(loaded: LoadedRecipe) -> Path:
    """`output.dir` of the recipe with `-bench` appended, so a bench never mixes with a run's images."""
    run_dir = resolve_output_dir(loaded.recipe, None)
    return run_dir.with_name(run_dir.name + "-bench")


class Bench:
    """Plan every entry up front (bad input fails before anything loads), then run them in order."""

    def __init__(
        self, loaded: LoadedRecipe, registry: Registry, options: BenchOptions, observer: BenchObserver
    ):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.registry = registry
        self.options = options
        self.observer = observer
        self.out_dir = Path(options.out).expanduser().resolve() if options.out else default_out(loaded)
        self.entries: list[Entry] = []
        self.report: dict[str, Any] = {}
        self.baseline_images: dict[tuple[int, int], Any] = {}
        self.environments: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Validate and plan every entry; raise RecipeError with every problem, or UsageError."""
        from dgrun.optimizer import Environment
        from dgrun.planner import plan_recipe

        if self.options.repeats < 1 or self.options.warmup < 0:
            raise UsageError("--repeats must be at least 1 and --warmup at least 0")
        plan_recipe(self.loaded, self.registry, Environment.guess(self.recipe.model.device))
        self._check_out_dir()
        problems: list[Problem] = []
        for name, role, overrides, index, sweep in self._planned():
            try:
                self.entries.append(self._entry(name, role, overrides, index, sweep))
            except RecipeError as error:
                problems.extend(p for p in error.problems if p not in problems)
        if problems:
            raise RecipeError(problems)

    def _planned(self) -> list[tuple[str, str, dict[str, Any], int | None, dict[str, Any]]]:
        planned: list[tuple[str, str, dict[str, Any], int | None, dict[str, Any]]] = [
            (BASELINE, "baseline", {"optimize": []}, None, {})
        ]
        if self.recipe.optimize:
            planned.append((self.recipe.name, "recipe", {}, None, {}))
        members = expand_variants(self.recipe)
        problems = member_name_problems(self.loaded, members)
        if problems:
            raise RecipeError(problems)
        planned.extend((m.name, "variant", m.overrides, m.index, m.sweep) for m in members)
        return planned

    def _entry(
        self, name: str, role: str, overrides: dict[str, Any], index: int | None, sweep: dict[str, Any]
    ) -> Entry:
        loaded = variant_recipe(self.loaded, overrides, index, sweep)
        description = self.recipe.variants[index].description if index is not None else None
        result: dict[str, Any] = {
            "name": name,
            "role": role,
            "description": description,
            "sweep": sweep or None,
            "overrides": overrides,
            "status": "pending",
            "error": None,
            "run_dir": f"variants/{name}",
            "recipe_sha256": loaded.recipe.sha256(),
            "plan": [],
            "timings": {},
            "calls": [],
            "cpu_seconds": [],
            "latency": None,
            "speedup": None,
            "peak_memory": None,
            "images": [],
            "fidelity": None,
            "adherence": None,
        }
        options = RunOptions(
            out=str(self.out_dir / "variants" / name),
            overwrite=True,
            trust_remote_code=self.options.trust_remote_code,
            argv=self.options.argv,
            wait_policy=self.options.wait_policy,
        )
        entry = Entry(name, role, loaded, result)
        entry.run = Run(loaded, self.registry, options, self.observer)
        try:
            self._preflight(entry)
        except RunError as exc:
            result["status"], result["error"] = "unavailable", str(exc)
        return entry

    def _preflight(self, entry: Entry) -> None:
        """Plan the entry as its run will (RecipeError: bad input; RunError: a step cannot run here)."""
        from dgrun.optimizer import Environment
        from dgrun.planner import plan_recipe

        device = entry.loaded.recipe.model.device
        if device not in self.environments:
            self.environments[device] = Environment.probe(device)
        plan = plan_recipe(entry.loaded, self.registry, self.environments[device])
        entry.device_kind = plan.env.device_kind
        entry.result["device"] = plan.env.device
        entry.result["plan"] = [s.record().model_dump(mode="json") for s in plan.steps]
        blocking = plan.blocking()
        if blocking:
            raise RunError("; ".join(f"step {s.name!r} cannot run here: {s.reason}" for s in blocking))

    def _check_out_dir(self) -> None:
        """A bench directory is reused only for the same recipe (or with --overwrite); never a foreign one."""
        directory = self.out_dir
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"output path {directory} exists and is not a directory")
        if not directory.is_dir() or not any(p for p in directory.iterdir() if not p.name.startswith(".")):
            return
        previous = read_json(directory / REPORT_FILE)
        if previous is None or previous.get("kind") != REPORT_KIND:
            raise UsageError(
                f"output directory {directory} holds files that are not a dgrun bench; use --out"
            )
        if previous.get("recipe_sha256") != self.recipe.sha256() and not self.options.overwrite:
            raise UsageError(
                f"output directory {directory} holds a bench of a different recipe "
                f"({previous.get('recipe', {}).get('name', '?')}); pass --overwrite or choose another --out"
            )

    def _clear_out_dir(self) -> None:
        shutil.rmtree(self.out_dir / "variants", ignore_errors=True)
        for name in ("report.json", "report.md", "report.html"):
            (self.out_dir / name).unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------- run
    def execute(self) -> dict[str, Any]:
        """Run every entry; on Ctrl-C keep what finished, write a partial report and re-raise."""
        from dgrun.report import write_reports

        if not self.entries:
            self.prepare()
        lock = OutputLock(self.out_dir, self.options.argv)
        try:
            lock.acquire()
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.out_dir}: {exc.strerror}") from None
        try:
            self._clear_out_dir()
            self.start_report()
            try:
                for entry in self.entries:
                    if entry.result["status"] == "pending":
                        self._run_entry(entry)
                    self.observer.variant_done(entry.result)
                    self._save()
            except KeyboardInterrupt:
                self._finish("interrupted")
                write_reports(self.report, self.out_dir)
                raise
            failed = any(e.result["status"] not in ("complete",) for e in self.entries)
            self._finish("failed" if failed else "complete")
            write_reports(self.report, self.out_dir)
        finally:
            lock.release()
        return self.report

    def start_report(self) -> None:
        env = self.environments.get(self.recipe.model.device)
        plugin_versions = {
            p.distribution: p.version
            for p in self.registry.plugins
            if p.distribution != "dgrun" and p.version
        }
        _, lpips_reason = lpips_status()
        self.report = {
            "kind": REPORT_KIND,
            "schema": REPORT_SCHEMA,
            "status": "running",
            "dgrun": __version__,
            "started_at": _now(),
            "finished_at": None,
            "command": self.options.argv,
            "recipe_file": str(self.loaded.path),
            "git": git_state(self.loaded.path),
            "recipe": self.recipe.resolved(),
            "recipe_sha256": self.recipe.sha256(),
            "settings": {"repeats": self.options.repeats, "warmup": self.options.warmup},
            "environment": {
                "versions": package_versions(plugin_versions),
                "device": env.device if env is not None else self.recipe.model.device,
                "plugins": [
                    {"name": p.name, "distribution": p.distribution, "version": p.version, "error": p.error}
                    for p in self.registry.plugins
                ],
            },
            "metrics": {
                "psnr": "dB on 8-bit RGB against the baseline's image; null = identical pixels (infinite)",
                "ssim": "Gaussian window 11×11, σ 1.5, mean over RGB channels",
                "lpips": {"available": lpips_reason is None, "reason": lpips_reason},
                "latency": "per image: each timed pipeline call's seconds divided by its images",
                "speedup": "baseline median latency / variant median latency",
            },
            "variants": [e.result for e in self.entries],
        }
        self._save()

    def _save(self) -> None:
        write_json(self.out_dir / REPORT_FILE, self.report)

    def _finish(self, status: str) -> None:
        for entry in self.entries:
            if entry.result["status"] == "running":
                entry.result["status"] = "interrupted"
            elif entry.result["status"] == "pending":
                entry.result["status"] = "not run"
        self.report["status"] = status
        self.report["finished_at"] = _now()
        self._save()

    def add_entry(self, name: str, overrides: dict[str, Any], role: str = "variant") -> Entry:
        """One more entry made of the recipe with `overrides` (RecipeError if invalid; `unavailable` if a
        step cannot run here); `dgrun tune` adds its trials this way."""
        entry = self._entry(name, role, overrides, None, {})
        self.entries.append(entry)
        self.report.setdefault("variants", [])
        if entry.result not in self.report["variants"]:
            self.report["variants"].append(entry.result)
        return entry

    def run_entry(self, entry: Entry, stop: Any = None) -> None:
        """Run and score one entry on a fresh pipeline (`stop(calls)` may end its timed passes early:
        the entry is then `stopped`, unscored)."""
        self._run_entry(entry, stop)
        self._save()

    def _run_entry(self, entry: Entry, stop: Any = None) -> None:
        result, run = entry.result, entry.run
        assert run is not None
        result["status"] = "running"
        self._save()
        self.observer.variant_started(result)
        try:
            with PeakMemory(entry.device_kind) as memory:
                try:
                    record = run.execute()
                finally:
                    if run.record is not None:
                        result["plan"] = [s.model_dump(mode="json") for s in run.record.plan]
                        result["timings"] = run.record.timings.model_dump(mode="json")
                for number in range(self.options.warmup):
                    self.observer.stage(f"warmup pass {number + 1} of {self.options.warmup}")
                    run.timed_pass()
                stopped = False
                for number in range(self.options.repeats):
                    self.observer.stage(f"timed pass {number + 1} of {self.options.repeats}")
                    cpu_started = time.process_time()
                    calls = run.timed_pass(stop)
                    result["cpu_seconds"].append(round(time.process_time() - cpu_started, 6))
                    result["calls"].append([[count, round(seconds, 6)] for count, seconds in calls])
                    if len(calls) < run.calls_per_pass:
                        stopped = True
                        break
            result["peak_memory"] = memory.record()
            result["latency"] = latency_summary(result["calls"], result["cpu_seconds"])
            if stopped:
                result["status"] = "stopped"
                return
            self.observer.pipeline_ready(result, run.pipe)
            self._score(entry, record)
            result["status"] = "complete"
        except KeyboardInterrupt:
            result["status"] = "interrupted"
            raise
        except DgrunError as exc:
            result["status"], result["error"] = "failed", str(exc)
        except Exception as exc:
            result["status"], result["error"] = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            run.undo_steps()  # process-wide settings the steps changed: the next entry starts clean
            run.pipe = None
            entry.run = None
            _release()

    def _score(self, entry: Entry, record: dict[str, Any]) -> None:
        """Fidelity against the baseline's images, speedup against its median, adherence if known."""
        from PIL import Image

        result = entry.result
        run_dir = self.out_dir / result["run_dir"]
        pairs = []
        for image in record["images"]:
            with Image.open(run_dir / image["file"]) as handle:
                pixels = handle.convert("RGB")
            key = (image["prompt_index"], image["image_index"])
            item = {k: image[k] for k in ("file", "prompt_index", "image_index", "prompt", "seed", "sha256")}
            item["path"] = f"{result['run_dir']}/{image['file']}"
            if entry.role == "baseline":
                self.baseline_images[key] = pixels
            if key in self.baseline_images:
                item["fidelity"] = compare(self.baseline_images[key], pixels)
            else:
                item["fidelity"] = {"comparable": False, "reason": "no baseline image"}
            result["images"].append(item)
            pairs.append((image["prompt"], pixels))
        result["fidelity"] = fidelity_summary(result["images"])
        result["adherence"] = adherence(entry.loaded.recipe.model.id, pairs)
        base = self.entries[0].result.get("latency") if self.entries else None
        if base and result["latency"] and result["latency"]["median_seconds"] > 0:
            speedup = base["median_seconds"] / result["latency"]["median_seconds"]
            result["speedup"] = round(speedup, 4)


def _release() -> None:
    """Drop what a finished entry left: Python garbage, torch.compile caches, cached CUDA blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if "torch._dynamo" in sys.modules:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_bench(
    loaded: LoadedRecipe, registry: Registry, options: BenchOptions, observer: BenchObserver | None = None
) -> dict[str, Any]:
    """Prepare and run a bench; return its report (also written to the output directory)."""
    bench = Bench(loaded, registry, options, observer or BenchObserver())
    bench.prepare()
    return bench.execute()
