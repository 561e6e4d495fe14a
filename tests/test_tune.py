"""`dgrun tune`: a small real search on dgrun:default, its tuned recipe, resume after Ctrl-C, refused
combinations that never run, and the same proposals for the same seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

from dgrun.bench import Bench, BenchObserver, BenchOptions  # noqa: E402
from dgrun.loading import load_recipe  # noqa: E402
from dgrun.optimizer import Environment  # noqa: E402
from dgrun.planner import plan_recipe  # noqa: E402
from dgrun.plugins import build_registry  # noqa: E402
from dgrun.tune.search import TuneObserver, TuneOptions, Tuner  # noqa: E402

RECIPE = """\
dgrun: 1
name: tiny-search
model: {id: "dgrun:default"}
generate: {steps: 4, threads: 1}
prompts: [a red circle on a blue background, a green square on a white background]
tune:
  objective: latency
  constraints: {psnr_min: 5}
  space:
    - first_block_cache: {optional: true}
    - deepcache: {interval: [2, 3], optional: true}
    - vae_slicing: {optional: true}
  generate: {batch_size: [1, 2]}
  trials: 3
  sampler: random
  seed: 7
"""


def _tuner(directory: Path, trials: int, resume: bool = False, observer: TuneObserver | None = None) -> Tuner:
    path = directory / "search.yaml"
    path.write_text(RECIPE)
    options = TuneOptions(trials=trials, out=str(directory / "out"), resume=resume, repeats=1, warmup=0)
    return Tuner(load_recipe(path), build_registry(), options, observer or TuneObserver())


class InterruptAfterOne(TuneObserver):
    def __init__(self) -> None:
        self.done = 0

    def trial_done(self, trial: dict[str, Any], best: dict[str, Any] | None) -> None:
        if trial["status"] != "rejected":
            self.done += 1
            if self.done == 1:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("DeepCache")
    directory = tmp_path_factory.mktemp("tune")
    with pytest.raises(KeyboardInterrupt):
        _tuner(directory, 3, observer=InterruptAfterOne()).execute()
    return directory, _tuner(directory, 3, resume=True).execute()


def test_ctrl_c_then_resume_continues_the_same_study(search):
    directory, _ = search
    study = optuna.load_study(study_name="dgrun-tune", storage=f"sqlite:///{directory / 'out' / 'study.db'}")
    counted = [t for t in study.trials if t.user_attrs.get("counted")]
    assert len(counted) == 3, "the resumed run added two trials to the one before Ctrl-C"
    interrupted = [t for t in study.trials if t.user_attrs.get("outcome", {}).get("status") == "interrupted"]
    assert not interrupted or all(t.state.name == "FAIL" for t in interrupted)
    assert (directory / "out" / "report.html").exists() and (directory / "out" / "report.md").exists()


def test_refused_combinations_cost_no_trial_and_never_run(search):
    directory, report = search
    rejected = [t for t in report["trials"] if t["status"] == "rejected"]
    for trial in rejected:
        assert "first_block_cache" in trial["reason"] and "transformer" in trial["reason"]
    ran = {p.name for p in (directory / "out" / "trials" / "variants").iterdir()}
    assert not any(f"trial-{t['number']:03d}" in ran for t in rejected)
    counted = [t for t in report["trials"] if t["status"] != "rejected" and t["status"] != "interrupted"]
    assert len(counted) >= 3


def test_the_tuned_recipe_is_the_fastest_feasible_trial_and_holds_when_benched_again(search, tmp_path):
    directory, report = search
    feasible = [t for t in report["trials"] if t["status"] == "feasible"]
    assert feasible and report["best"]["number"] == min(feasible, key=lambda t: t["latency_s"])["number"]
    tuned = Path(report["tuned_recipe"])
    assert tuned.parent == directory / "out" and tuned.read_text().startswith("# Found by `dgrun tune")
    loaded = load_recipe(tuned)
    assert loaded.recipe.tune is None
    plan = plan_recipe(loaded, build_registry(), Environment("cpu", "cpu"))
    assert [s.name for s in plan.steps] == [
        (item if isinstance(item, str) else next(iter(item)))
        for item in report["best"]["overrides"]["optimize"]
    ]
    bench = Bench(loaded, build_registry(), BenchOptions(1, 0, str(tmp_path / "again")), BenchObserver())
    bench.prepare()
    again = bench.execute()
    tuned_result = (
        next(v for v in again["variants"] if v["role"] == "recipe") if loaded.recipe.optimize else None
    )
    if tuned_result is not None:
        psnr = tuned_result["fidelity"]["psnr_min_db"]
        assert tuned_result["fidelity"]["identical"] or psnr >= 5


def test_the_same_seed_proposes_the_same_sequence(search):
    directory, report = search
    (directory / "fresh").mkdir(exist_ok=True)
    tuner = _tuner(directory / "fresh", 3)
    study = optuna.create_study(sampler=tuner._sampler())
    proposals: list[str] = []
    for _ in range(12):
        trial = study.ask()
        chosen = {
            name: trial.suggest_categorical(name, values) for name, values in tuner.dimensions().items()
        }
        key = json.dumps(tuner.overrides(chosen), sort_keys=True)
        if key not in proposals:
            proposals.append(key)
        study.tell(trial, 1.0)
    recorded = [
        json.dumps(t["overrides"], sort_keys=True) for t in report["trials"] if t["status"] != "interrupted"
    ]
    distinct = list(dict.fromkeys(recorded))
    assert distinct == proposals[: len(distinct)]
