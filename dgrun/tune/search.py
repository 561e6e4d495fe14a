"""`dgrun tune`: an Optuna study over the recipe's `tune:` space, each trial a fresh-pipeline bench entry.

The study lives in SQLite in the output directory (Optuna's own RDB storage: resumable after Ctrl-C or a
crash, and readable with Optuna's tools). Each trial asks the sampler for one choice per dimension, builds
the recipe those choices make, and plans it: a combination the planner refuses (a conflict, the wrong model
kind, a step unavailable here) is recorded with the reason and costs no trial. The others run as `dgrun
bench` runs an entry (load, apply, warm up, timed passes, fidelity against the baseline, adherence), and a
trial already slower than the best feasible one is stopped early and recorded as pruned. The same recipe
with the same seed proposes the same sequence.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgrun.bench import Bench, BenchObserver, BenchOptions
from dgrun.errors import RecipeError, RunError, UsageError
from dgrun.loading import LoadedRecipe
from dgrun.lock import OutputLock
from dgrun.outputs import resolve_output_dir
from dgrun.plugins import Registry
from dgrun.tune.spec import TuneSpec

STUDY_FILE = "study.db"
STUDY_NAME = "dgrun-tune"
MAX_ATTEMPTS_PER_TRIAL = 20  # proposals (refused or repeated ones included) per counted trial, at most
PRUNE_MARGIN = 1.05  # stop a trial once its latency so far is this much slower than the best feasible one


@dataclass
class TuneOptions:
    trials: int | None = None  # default: the recipe's tune.trials
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    repeats: int = 2
    warmup: int = 1
    trust_remote_code: bool = False
    argv: list[str] = field(default_factory=list)
    wait_policy: str | None = None


class TuneObserver(BenchObserver):
    """Progress of a search (the CLI's live table); the default does nothing."""

    def trial_done(self, trial: dict[str, Any], best: dict[str, Any] | None) -> None: ...


def default_out(loaded: LoadedRecipe) -> Path:
    run_dir = resolve_output_dir(loaded.recipe, None)
    return run_dir.with_name(run_dir.name + "-tune")


class Tuner:
    """One search: the study, the bench that runs its trials, and what became of each trial."""

    def __init__(
        self, loaded: LoadedRecipe, registry: Registry, options: TuneOptions, observer: TuneObserver
    ):
        if loaded.recipe.tune is None:
            raise UsageError(f"{loaded.path} has no `tune:` section; add one (docs/recipes.md, Tuning)")
        self.loaded = loaded
        self.spec: TuneSpec = loaded.recipe.tune
        self.registry = registry
        self.options = options
        self.observer = observer
        self.out_dir = Path(options.out).expanduser().resolve() if options.out else default_out(loaded)
        self.trials: list[dict[str, Any]] = []
        self.budget = options.trials or self.spec.trials
        self.baseline: dict[str, Any] | None = None
        self.shortfall: str | None = None

    # ------------------------------------------------------------------------------------------ study
    def _study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{self.out_dir / STUDY_FILE}"
        exists = (self.out_dir / STUDY_FILE).exists()
        if exists and not self.options.resume:
            if not self.options.overwrite:
                raise UsageError(
                    f"{self.out_dir} holds a study already: pass --resume to continue it, or --overwrite"
                )
            (self.out_dir / STUDY_FILE).unlink()
            exists = False
        direction = "maximize" if self.spec.objective == "throughput" else "minimize"
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            sampler=self._sampler(),
            direction=direction,
            load_if_exists=exists,
        )
        recipe_sha = self.loaded.recipe.sha256()
        if exists and study.user_attrs.get("recipe_sha256") not in (None, recipe_sha):
            raise UsageError(f"{self.out_dir} holds the study of a different recipe; choose another --out")
        study.set_user_attr("recipe_sha256", recipe_sha)
        _fail_stale_trials(study)
        return study

    def _sampler(self) -> Any:
        import optuna

        seed = self.spec.seed
        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.spec.sampler == "grid":
            return optuna.samplers.GridSampler(self.dimensions(), seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)

    def dimensions(self) -> dict[str, list[Any]]:
        """Every choice the space makes, as Optuna parameters (JSON for non-scalar choices)."""
        dims: dict[str, list[Any]] = {}
        for step in self.spec.space:
            if step.optional:
                dims[f"{step.name}.use"] = [True, False]
            for param, values in step.choices().items():
                dims[f"{step.name}.{param}"] = [_scalar(v) for v in values]
        for key, values in self.spec.generate.items():
            dims[f"generate.{key}"] = [_scalar(v) for v in values]
        return dims

    def overrides(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """The recipe overrides a set of choices makes: the steps in space order, and generate keys."""
        steps: list[Any] = []
        for step in self.spec.space:
            if step.optional and not chosen[f"{step.name}.use"]:
                continue
            params = dict(step.fixed())
            params.update({p: _value(chosen[f"{step.name}.{p}"]) for p in step.choices()})
            steps.append({step.name: params} if params else step.name)
        overrides: dict[str, Any] = {"optimize": steps}
        if self.spec.generate:
            overrides["generate"] = {k: _value(chosen[f"generate.{k}"]) for k in self.spec.generate}
        return overrides

    # -------------------------------------------------------------------------------------------- run
    def execute(self) -> dict[str, Any]:
        """Run the search (or continue it); returns the report (also written)."""
        from dgrun.tune.report import write_reports

        lock = OutputLock(self.out_dir, self.options.argv)
        try:
            lock.acquire()
        except OSError as exc:
            raise UsageError(f"cannot create output directory {self.out_dir}: {exc.strerror}") from None
        try:
            study = self._study()
            bench = self._bench()
            self.baseline = self._run_baseline(bench)
            try:
                self._search(study, bench)
            finally:
                report = self.report(study)
                write_reports(report, self.out_dir)
            return report
        finally:
            lock.release()

    def _bench(self) -> Bench:
        options = BenchOptions(
            self.options.repeats,
            self.options.warmup,
            str(self.out_dir / "trials"),
            True,
            self.options.trust_remote_code,
            self.options.argv,
            self.options.wait_policy,
        )
        bench = Bench(self.loaded, self.registry, options, self.observer)
        bench.start_report()
        return bench

    def _run_baseline(self, bench: Bench) -> dict[str, Any]:
        entry = bench.add_entry("baseline", {"optimize": []}, role="baseline")
        bench.run_entry(entry)
        if entry.result["status"] != "complete":
            raise RunError(f"the baseline failed: {entry.result.get('error')}")
        return entry.result

    def _search(self, study: Any, bench: Bench) -> None:
        from optuna.trial import TrialState

        # What earlier runs of this study tried: a resumed search (same seed, so the same proposals) skips
        # those at once and goes on where the interrupted one stopped.
        seen: dict[str, dict[str, Any]] = {}
        for earlier in study.trials:
            outcome = earlier.user_attrs.get("outcome")
            if outcome and outcome.get("status") != "interrupted" and not outcome.get("repeat_of"):
                seen[json.dumps(outcome["overrides"], sort_keys=True)] = outcome
        counted = sum(1 for t in study.trials if t.user_attrs.get("counted"))
        attempts = 0
        while counted < self.budget and attempts < self.budget * MAX_ATTEMPTS_PER_TRIAL:
            attempts += 1
            trial = study.ask()
            chosen = {
                name: trial.suggest_categorical(name, values) for name, values in self.dimensions().items()
            }
            overrides = self.overrides(chosen)
            key = json.dumps(overrides, sort_keys=True)
            if key in seen:  # a combination already tried: the same answer, without running it again
                self._tell_again(study, trial, seen[key])
                continue
            reason = self._refusal(overrides)
            if reason is not None:
                outcome = {
                    "status": "rejected",
                    "reason": reason,
                    "overrides": overrides,
                    "number": trial.number,
                }
                trial.set_user_attr("outcome", outcome)
                study.tell(trial, state=TrialState.FAIL)
                seen[key] = outcome
                self._record(outcome)
                continue
            try:
                outcome = self._evaluate(bench, trial, overrides)
            except KeyboardInterrupt:
                trial.set_user_attr("outcome", {"status": "interrupted", "overrides": overrides})
                study.tell(trial, state=TrialState.FAIL)
                raise
            seen[key] = outcome
            counted += 1
            trial.set_user_attr("counted", True)
            trial.set_user_attr("outcome", outcome)
            if outcome["status"] in ("feasible", "infeasible"):
                _set_constraints(trial, outcome)  # constrained TPE prefers feasible trials
            if outcome["status"] == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            elif outcome["status"] == "failed":
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, outcome["objective"])
            self._record(outcome)
        if counted < self.budget:
            self.shortfall = f"only {counted} of {self.budget} trials could run: fewer runnable combinations"

    def _tell_again(self, study: Any, trial: Any, outcome: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("outcome", {**outcome, "repeat_of": outcome.get("number")})
        if outcome["status"] in ("feasible", "infeasible"):
            _set_constraints(trial, outcome)
            study.tell(trial, outcome["objective"])
        else:
            study.tell(trial, state=TrialState.FAIL)

    def _refusal(self, overrides: dict[str, Any]) -> str | None:
        """Why the planner refuses the recipe these choices make (or a step cannot run here), or None."""
        from dgrun.optimizer import Environment
        from dgrun.planner import plan_recipe
        from dgrun.variants import variant_recipe

        try:
            loaded = variant_recipe(self.loaded, overrides)
            plan = plan_recipe(loaded, self.registry, Environment.probe(loaded.recipe.model.device))
        except RecipeError as error:
            return "; ".join(p.message for p in error.problems)
        blocking = plan.blocking()
        if blocking:
            return "; ".join(f"{s.name} cannot run here: {s.reason}" for s in blocking)
        return None

    def _evaluate(self, bench: Bench, trial: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        entry = bench.add_entry(f"trial-{trial.number:03d}", overrides)
        best = self.best()

        def stop(calls: list[tuple[int, float]]) -> bool:
            if best is None or self.spec.objective != "latency" or len(calls) < 1:
                return False
            per_image = statistics.median(seconds / max(count, 1) for count, seconds in calls)
            return per_image > best["objective"] * PRUNE_MARGIN

        bench.run_entry(entry, stop)
        return self._outcome(trial.number, overrides, entry.result)

    def _outcome(self, number: int, overrides: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        outcome: dict[str, Any] = {
            "number": number,
            "name": result["name"],
            "overrides": overrides,
            "latency_s": (result.get("latency") or {}).get("median_seconds"),
            "throughput": (result.get("latency") or {}).get("images_per_second"),
            "peak_memory_bytes": (result.get("peak_memory") or {}).get("bytes"),
            "psnr_min_db": (result.get("fidelity") or {}).get("psnr_min_db"),
            "identical": (result.get("fidelity") or {}).get("identical"),
            "ssim_mean": (result.get("fidelity") or {}).get("ssim_mean"),
            "adherence": (result.get("adherence") or {}).get("all")
            if (result.get("adherence") or {}).get("available")
            else None,
            "speedup": result.get("speedup"),
            "run_dir": result.get("run_dir"),
            "plan": result.get("plan"),
        }
        if result["status"] == "stopped":
            return {**outcome, "status": "pruned", "reason": "slower than the best feasible trial"}
        if result["status"] != "complete":
            return {**outcome, "status": "failed", "reason": result.get("error")}
        outcome["objective"] = {
            "latency": outcome["latency_s"],
            "throughput": outcome["throughput"],
            "peak_memory": outcome["peak_memory_bytes"],
        }[self.spec.objective]
        violations, values = self._constraints(outcome)
        outcome["constraint_values"] = values
        outcome["status"] = "feasible" if not violations else "infeasible"
        outcome["violations"] = violations
        return outcome

    def _constraints(self, outcome: dict[str, Any]) -> tuple[list[str], list[float]]:
        """Broken constraints in words, and Optuna's constraint values (<= 0: satisfied)."""
        c = self.spec.constraints
        violations: list[str] = []
        values: list[float] = []
        psnr = (
            float("inf") if outcome["identical"] or outcome["psnr_min_db"] is None else outcome["psnr_min_db"]
        )
        checks = [
            (c.psnr_min, psnr, "psnr_min", "worst PSNR {v:.2f} dB < {limit}"),
            (c.ssim_min, outcome["ssim_mean"], "ssim_min", "mean SSIM {v:.4f} < {limit}"),
            (c.adherence_min, outcome["adherence"], "adherence_min", "adherence {v:.3f} < {limit}"),
        ]
        for limit, value, name, text in checks:
            if limit is None:
                continue
            if value is None:
                if name != "adherence_min":
                    violations.append(f"{name}: not measured")
                continue
            margin = limit - min(value, 1e6)
            values.append(margin)
            if margin > 0:
                violations.append(text.format(v=value, limit=limit))
        memory = c.memory_bytes()
        if memory is not None and outcome["peak_memory_bytes"] is not None:
            values.append(float(outcome["peak_memory_bytes"] - memory))
            if outcome["peak_memory_bytes"] > memory:
                violations.append(f"peak memory {outcome['peak_memory_bytes']} bytes > {c.peak_memory_max}")
        return violations, values or [0.0]

    def _record(self, outcome: dict[str, Any]) -> None:
        self.trials.append(outcome)
        self.observer.trial_done(outcome, self.best())

    def best(self, trials: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The best feasible trial so far (lowest latency or memory, highest throughput)."""
        feasible = [
            t for t in (trials if trials is not None else self.trials) if t.get("status") == "feasible"
        ]
        if not feasible:
            return None
        sign = -1 if self.spec.objective == "throughput" else 1
        return min(feasible, key=lambda t: (sign * t["objective"], t["number"]))

    # ----------------------------------------------------------------------------------------- report
    def report(self, study: Any) -> dict[str, Any]:
        """Every trial of the study (this run's and earlier ones'), the best, and the tuned recipe."""
        from dgrun.tune.recipe_out import write_tuned_recipe

        trials = [t.user_attrs["outcome"] for t in study.trials if "outcome" in t.user_attrs]
        best = self.best(trials)
        ranked = sorted(
            (t for t in trials if t.get("status") == "feasible" and not t.get("repeat_of")),
            key=lambda t: (
                t["objective"] if self.spec.objective != "throughput" else -t["objective"],
                t["number"],
            ),
        )
        tuned = write_tuned_recipe(self.loaded, best, self.out_dir, len(trials), self.spec) if best else None
        return {
            "kind": "dgrun-tune",
            "schema": 1,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": self.loaded.recipe.resolved(),
            "recipe_file": str(self.loaded.path),
            "study": {"storage": f"sqlite:///{self.out_dir / STUDY_FILE}", "name": STUDY_NAME},
            "objective": self.spec.objective,
            "constraints": self.spec.constraints.model_dump(mode="json"),
            "budget": self.budget,
            "baseline": _summary(self.baseline),
            "trials": [t for t in trials if not t.get("repeat_of")],
            "best": best,
            "runner_up": ranked[1] if len(ranked) > 1 else None,
            "tuned_recipe": str(tuned) if tuned else None,
            "nearest_misses": _nearest_misses(trials) if best is None else [],
            "shortfall": self.shortfall,
        }


def _summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    latency = result.get("latency") or {}
    return {
        "latency_s": latency.get("median_seconds"),
        "throughput": latency.get("images_per_second"),
        "peak_memory_bytes": (result.get("peak_memory") or {}).get("bytes"),
        "run_dir": result.get("run_dir"),
    }


def _nearest_misses(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    infeasible = [t for t in trials if t.get("status") == "infeasible" and not t.get("repeat_of")]
    return sorted(
        infeasible, key=lambda t: (len(t.get("violations") or []), -max(t.get("constraint_values") or [0]))
    )[:3]


def _set_constraints(trial: Any, outcome: dict[str, Any]) -> None:
    for index, value in enumerate(outcome["constraint_values"]):
        trial.set_constraint(f"c{index}", float(value))


def _fail_stale_trials(study: Any) -> None:
    """Trials left RUNNING by a process that died (kill -9, a crash) are closed as failed on resume."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:
            continue


def _scalar(value: Any) -> Any:
    """Optuna's categorical choices are scalars: lists and mappings travel as JSON."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _value(choice: Any) -> Any:
    if isinstance(choice, str) and choice[:1] in ("[", "{"):
        try:
            return json.loads(choice)
        except ValueError:
            return choice
    return choice


def run_tune(
    loaded: LoadedRecipe, registry: Registry, options: TuneOptions, observer: TuneObserver | None = None
) -> dict[str, Any]:
    return Tuner(loaded, registry, options, observer or TuneObserver()).execute()
