"""`dgrun bench` on the tiny UNet: report shape, fidelity, fresh pipelines, sweeps, Ctrl-C.

One bench (the baseline, the recipe, a variant and a three-value sweep of the recipe's step) is run once
for the module and inspected by several tests; the machine is small, so each entry makes two 3-step
images in one pipeline call, once recorded and once timed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from dgrun import metrics
from dgrun.bench import Bench, BenchObserver, BenchOptions, run_bench
from dgrun.cli import app
from dgrun.errors import RecipeError, UsageError
from dgrun.loading import load_recipe
from dgrun.plugins import build_registry
from dgrun.testing import recipe_data, write_recipe
from dgrun.variants import expand_variants

pytest.importorskip("DeepCache")

NAMES = [
    "baseline",
    "test",
    "broken",
    "plain",
    "deepcache-interval-1",
    "deepcache-interval-3",
    "deepcache-interval-5",
]
FINISHED = [name for name in NAMES if name != "broken"]


def _bench_recipe(**overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "generate": {"steps": 3, "batch_size": 2},
        "optimize": [{"deepcache": {"interval": 2}}],
        "variants": [
            {"name": "broken", "optimize": [{"deepcache": {"branch_id": 9}}]},  # fails when applied
            {"name": "plain", "optimize": []},
            {"name": "deepcache", "sweep": {"deepcache.interval": [1, 3, 5]}},
        ],
    }
    return recipe_data(**{**defaults, **overrides})


def leftover_state(pipe: Any) -> list[str]:
    """What optimizations leave on modules: patched forwards, diffusers hooks, compiled call paths."""
    found = []
    for component_name, component in pipe.components.items():
        if not hasattr(component, "named_modules"):
            continue
        for name, module in component.named_modules():
            where = f"{component_name}.{name}" if name else component_name
            if "forward" in vars(module):
                found.append(f"{where}: patched forward")
            if getattr(module, "_diffusers_hook", None) is not None:
                found.append(f"{where}: diffusers hook")
            if getattr(module, "_compiled_call_impl", None) is not None:
                found.append(f"{where}: compiled")
    return found


class Inspector(BenchObserver):
    """Records, for each entry, which pipeline object it ran and what state its modules carried."""

    def __init__(self) -> None:
        self.pipes: dict[str, dict[str, Any]] = {}

    def pipeline_ready(self, result: dict[str, Any], pipe: Any) -> None:
        self.pipes[result["name"]] = {
            "pipe": id(pipe),
            "unet": id(pipe.unet),
            "leftovers": leftover_state(pipe),
        }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Inspector]:
    directory = tmp_path_factory.mktemp("bench")
    path = write_recipe(directory, _bench_recipe())
    inspector = Inspector()
    previous = Path.cwd()
    os.chdir(directory)
    try:
        report = run_bench(load_recipe(path), build_registry(), BenchOptions(repeats=1, warmup=0), inspector)
    finally:
        os.chdir(previous)
    return report, directory / "outputs" / "test-bench", inspector


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in report["variants"]}


def test_bench_writes_three_reports_with_every_variant(bench):
    report, out, _ = bench
    assert report["status"] == "failed"  # one variant failed; the others ran
    assert [v["name"] for v in report["variants"] if v["status"] == "complete"] == FINISHED
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["kind"] == "dgrun-bench" and on_disk["schema"] == 1
    assert [v["name"] for v in on_disk["variants"]] == NAMES
    assert [v["role"] for v in on_disk["variants"]][:3] == ["baseline", "recipe", "variant"]
    assert on_disk["settings"] == {"repeats": 1, "warmup": 0}
    assert {"torch", "diffusers", "dgrun", "python"} <= set(on_disk["environment"]["versions"])
    assert on_disk["environment"]["device"] == "cpu"
    for variant in on_disk["variants"]:
        if variant["name"] == "broken":
            continue
        timings = variant["timings"]
        assert timings["load_seconds"] > 0 and timings["first_call_seconds"] > 0
        assert timings["apply_seconds"] is not None
        assert len(variant["calls"]) == 1 and variant["calls"][0][0][0] == 2  # 1 repeat, one call of 2 images
        latency = variant["latency"]
        assert latency["min_seconds"] <= latency["median_seconds"] <= latency["max_seconds"]
        assert latency["images_per_second"] > 0 and variant["speedup"] > 0
        assert variant["peak_memory"]["kind"] == "peak_rss" and variant["peak_memory"]["bytes"] > 0
        assert len(variant["images"]) == 2
        assert all((out / image["path"]).is_file() for image in variant["images"])
        assert (out / variant["run_dir"] / "run.json").is_file()
    assert on_disk["metrics"]["lpips"]["available"] in (True, False)

    markdown = (out / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "complete" in line]
    assert len(rows) == len(FINISHED) and "| broken | failed |" in markdown
    page = (out / "report.html").read_text()
    assert page.count("<img ") == len(FINISHED) * 2 + 2  # the grid, plus the two plots
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_baseline_against_itself_is_identical(bench):
    baseline = _by_name(bench[0])["baseline"]
    assert baseline["speedup"] == 1.0
    assert baseline["fidelity"]["identical"] and baseline["fidelity"]["psnr_min_db"] is None
    for image in baseline["images"]:
        assert image["fidelity"]["identical"] and image["fidelity"]["psnr_db"] is None
        assert image["fidelity"]["ssim"] == 1.0 and image["fidelity"]["max_abs_diff"] == 0


def test_a_variant_that_changes_outputs_has_a_finite_psnr(bench):
    variants = _by_name(bench[0])
    cached = variants["test"]["fidelity"]
    assert not cached["identical"]
    assert math.isfinite(cached["psnr_min_db"]) and 10 < cached["psnr_min_db"] < 100
    assert 0 < cached["ssim_mean"] < 1
    assert variants["deepcache-interval-1"]["fidelity"]["identical"]  # refreshing every step changes nothing


def test_every_variant_runs_on_a_fresh_pipeline(bench):
    report, _, inspector = bench
    pipes = inspector.pipes
    assert list(pipes) == FINISHED
    assert len({p["pipe"] for p in pipes.values()}) == len(FINISHED)
    assert len({p["unet"] for p in pipes.values()}) == len(FINISHED)
    # DeepCache patches forwards, and the check sees it ...
    assert any("patched forward" in item for item in pipes["test"]["leftovers"])
    # ... but the entries after it start clean and draw the baseline's exact bytes.
    for name in ("baseline", "plain"):
        assert pipes[name]["leftovers"] == [], name
    variants = _by_name(report)
    assert [i["sha256"] for i in variants["plain"]["images"]] == [
        i["sha256"] for i in variants["baseline"]["images"]
    ]


def test_a_failing_variant_is_recorded_and_the_rest_still_run(bench):
    broken = _by_name(bench[0])["broken"]
    assert broken["status"] == "failed" and "branch_id 9 is out of range" in broken["error"]
    assert broken["latency"] is None and broken["images"] == []
    assert broken["plan"][0]["step"] == "deepcache"


def test_a_sweep_expands_into_named_variants_with_their_values(bench):
    variants = _by_name(bench[0])
    for value in (1, 3, 5):
        variant = variants[f"deepcache-interval-{value}"]
        assert variant["sweep"] == {"deepcache.interval": value}
        assert variant["overrides"] == {"optimize": [{"deepcache": {"interval": value}}]}
        assert variant["plan"][0]["step"] == "deepcache" and variant["plan"][0]["params"]["interval"] == value
        assert (Path(bench[1]) / variant["run_dir"] / "run.json").is_file()


def test_sweep_mistakes_are_reported_at_their_position(tmp_path):
    text = (
        "dgrun: 1\nname: s\nmodel: {id: 'dgrun:tiny-sd'}\nprompts: [a]\noptimize: [deepcache]\n"
        "variants:\n"
        "  - name: a\n"
        "    sweep: {nocache.interval: [2]}\n"
        "  - name: b\n"
        "    sweep:\n"
        "      deepcache.interval: [2, 2]\n"
        "  - name: c\n"
        "    sweep: {generate.steps: [0]}\n"
    )
    (tmp_path / "s.yaml").write_text(text)
    result = CliRunner().invoke(app, ["check", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2
    output = result.output.replace("\n", " ")
    assert "s.yaml:8:" in output and "no step 'nocache'" in output
    assert "s.yaml:11:" in output and "listed twice" in output
    assert "s.yaml:13:" in output and "greater than or equal to 1" in output


def test_a_bad_swept_step_value_points_at_the_sweep_key(tmp_path):
    text = (
        "dgrun: 1\nname: s\nmodel: {id: 'dgrun:tiny-sd'}\nprompts: [a]\n"
        "variants:\n"
        "  - name: cached\n"
        "    optimize: [deepcache]\n"
        "    sweep:\n"
        "      deepcache.interval: [2, 0]\n"
    )
    (tmp_path / "s.yaml").write_text(text)
    bench = Bench(
        load_recipe(tmp_path / "s.yaml"),
        build_registry(),
        BenchOptions(out=str(tmp_path / "o")),
        BenchObserver(),
    )
    with pytest.raises(RecipeError) as caught:
        bench.prepare()
    (problem,) = caught.value.problems
    assert (problem.position.line, problem.position.column) == (9, 7)
    assert "greater than or equal to 1" in problem.message


def test_ctrl_c_keeps_finished_variants_in_a_partial_report(tmp_path, monkeypatch):
    from dgrun.cli.experiments import LiveTable

    data = _bench_recipe(prompts=["a red circle on a blue background"])
    write_recipe(tmp_path, data)
    original = LiveTable.variant_started

    def interrupt_second(self: LiveTable, result: dict[str, Any]) -> None:
        if result["name"] != "baseline":
            raise KeyboardInterrupt
        original(self, result)

    monkeypatch.setattr(LiveTable, "variant_started", interrupt_second)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "recipe.yaml", "--repeats", "1", "--warmup", "0"])
    assert result.exit_code == 130, result.output
    assert "partial report" in result.output
    report = json.loads((tmp_path / "outputs" / "test-bench" / "report.json").read_text())
    assert report["status"] == "interrupted"
    statuses = {v["name"]: v["status"] for v in report["variants"]}
    assert statuses["baseline"] == "complete"
    assert statuses["test"] == "interrupted" and statuses["plain"] == "not run"
    assert (tmp_path / "outputs" / "test-bench" / "report.html").is_file()


def test_expand_variants_unrolls_grids_of_steps_and_recipe_keys(tmp_path):
    data = recipe_data(
        optimize=["vae_slicing", {"deepcache": {"branch_id": 0}}],
        variants=[
            {"name": "grid", "sweep": {"deepcache.interval": [2, 3], "generate.steps": [4, 8]}},
            {"name": "own", "optimize": ["deepcache"], "sweep": {"deepcache.branch_id": [1]}},
            {"name": "fixed", "generate": {"steps": 2}},
        ],
    )
    recipe = load_recipe(write_recipe(tmp_path, data)).recipe
    expanded = expand_variants(recipe)
    assert [v.name for v in expanded] == [
        "grid-interval-2-steps-4",
        "grid-interval-2-steps-8",
        "grid-interval-3-steps-4",
        "grid-interval-3-steps-8",
        "own-branch_id-1",
        "fixed",
    ]
    first = expanded[0]
    assert first.sweep == {"deepcache.interval": 2, "generate.steps": 4}
    assert first.overrides == {
        "optimize": ["vae_slicing", {"deepcache": {"branch_id": 0, "interval": 2}}],
        "generate": {"steps": 4},
    }
    assert expanded[4].overrides == {"optimize": [{"deepcache": {"branch_id": 1}}]}
    assert expanded[5].overrides == {"generate": {"steps": 2}} and expanded[5].sweep == {}
    assert recipe.optimize[1].params == {"branch_id": 0}  # the recipe itself is untouched


def test_bench_plans_entries_before_running_anything(tmp_path):
    data = _bench_recipe(variants=[{"name": "test", "optimize": []}])
    bench = Bench(
        load_recipe(write_recipe(tmp_path, data)),
        build_registry(),
        BenchOptions(out=str(tmp_path / "o")),
        BenchObserver(),
    )
    with pytest.raises(RecipeError, match="same name as the recipe"):
        bench.prepare()
    assert not (tmp_path / "o").exists()


def test_ssim_and_psnr_match_the_reference_implementation():
    # Reference values from scikit-image 0.26 `structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=255, channel_axis=-1)` and `peak_signal_noise_ratio`.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).round()
    assert metrics.ssim(a, b) == pytest.approx(0.9665551627135183, abs=1e-12)
    assert metrics.psnr(a, b) == pytest.approx(22.531809407956416, abs=1e-9)
    assert metrics.psnr(a, a) == math.inf and metrics.ssim(a, a) == pytest.approx(1.0)
    small = metrics.compare(a[:8, :8].astype(np.uint8), b[:8, :8].astype(np.uint8))
    assert small["comparable"] and 0 < small["ssim"] < 1  # smaller than the window: a smaller window


def test_adherence_is_scored_only_for_the_shapes_models():
    from dgrun.models import shapes

    prompt = "a red circle on a blue background"
    picture = shapes.draw(shapes.ShapeSpec("red", "circle", "blue"))
    scored = metrics.adherence("dgrun:default", [(prompt, picture)])
    assert scored["available"] and scored["all"] == 1.0
    assert metrics.adherence("dgrun:default", [("a cat", picture)])["available"] is False
    assert metrics.adherence("dgrun:tiny-sd", [(prompt, picture)]) is None


def test_steps_put_back_the_process_wide_switches_they_flipped():
    import torch

    from dgrun.optimizer import ApplyContext, Environment
    from dgrun.steps.runtime import TF32, CudnnBenchmark

    ctx = ApplyContext(env=Environment("cuda", "cuda", (9, 0)), model_kind=None)
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    steps = [TF32(TF32.Params()), CudnnBenchmark(CudnnBenchmark.Params(enabled=not before[1]))]
    for step in steps:
        step.apply(None, ctx)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark != before[1]
    for step in steps:
        step.undo()
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before


def test_bench_puts_back_the_global_attention_backend_between_variants(tmp_path):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active_at_start = _AttentionBackendRegistry._active_backend
    seen: dict[str, Any] = {}

    class Watch(BenchObserver):
        def pipeline_ready(self, result: dict[str, Any], pipe: Any) -> None:
            seen[result["name"]] = _AttentionBackendRegistry._active_backend

    data = recipe_data(
        model={"id": "dgrun:tiny-flux"},
        generate={"steps": 1},
        prompts=["x"],
        optimize=[],
        variants=[
            {"name": "math", "optimize": [{"attention_backend": {"backend": "_native_math"}}]},
            {"name": "plain", "optimize": []},
        ],
    )
    bench = Bench(
        load_recipe(write_recipe(tmp_path, data)),
        build_registry(),
        BenchOptions(repeats=1, warmup=0, out=str(tmp_path / "o")),
        Watch(),
    )
    bench.prepare()
    bench.execute()
    assert seen["math"] == AttentionBackendName("_native_math")
    # The next, freshly loaded pipeline runs with the backend it would have had on its own.
    assert seen["plain"] == active_at_start
    assert _AttentionBackendRegistry._active_backend == active_at_start


def test_a_bench_never_writes_into_a_directory_it_does_not_own(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    bench = Bench(
        load_recipe(write_recipe(tmp_path, _bench_recipe())),
        build_registry(),
        BenchOptions(out=str(tmp_path / "o"), overwrite=True),
        BenchObserver(),
    )
    with pytest.raises(UsageError, match="not a dgrun bench"):
        bench.prepare()
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"
