"""End-to-end runs on the tiny built-in models: images, records, reproducibility, resume, fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgrun.errors import RecipeError, RunError, UsageError
from dgrun.records import read_png_metadata, sha256_file
from dgrun.runner import RunObserver
from dgrun.testing import recipe_data, run_recipe_data, tiny_pipeline


def _pngs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


def test_run_writes_images_and_a_complete_record(tmp_path):
    record = run_recipe_data(tmp_path, {"optimize": ["tf32", "vae_slicing"]})
    out = tmp_path / "outputs" / "test"
    assert record["status"] == "complete"
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["status"] == "complete"
    assert on_disk["recipe_sha256"] == record["recipe_sha256"]
    assert set(on_disk["versions"]) >= {"python", "torch", "diffusers", "transformers", "accelerate", "dgrun"}
    assert on_disk["device"] == "cpu" and on_disk["dtype"] == "float32"
    assert on_disk["model"] == {
        "id": "dgrun:tiny-sd",
        "kind": "unet",
        "pipeline_class": "StableDiffusionPipeline",
    }
    assert [s["step"] for s in on_disk["plan"]] == ["tf32", "vae_slicing"]
    # Both ran, and their counters show they changed nothing here: recorded as such, not as `applied`.
    tf32, slicing = on_disk["plan"]
    assert tf32["status"] == "no effect" and "no-op" in tf32["detail"] and tf32["effect"]["no_effect"]
    assert slicing["status"] == "no effect" and slicing["effect"]["decodes"] == 2
    assert "one image" in slicing["effect"]["no_effect"]
    assert {"load_seconds", "apply_seconds", "warmup_seconds"} <= set(on_disk["timings"])
    assert on_disk["peak_memory"]["bytes"] > 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [i["file"] for i in on_disk["images"]]
    assert [i["seed"] for i in on_disk["images"]] == [0, 1]
    for image in on_disk["images"]:
        assert sha256_file(out / image["file"]) == image["sha256"]
        assert image["seconds"] > 0 and (image["width"], image["height"]) == (32, 32)
    assert not list(out.glob(".*tmp")), "temporary files were left behind"


def test_png_carries_the_resolved_recipe_prompt_and_seed(tmp_path):
    record = run_recipe_data(tmp_path)
    first = record["images"][0]
    meta = read_png_metadata(tmp_path / "outputs" / "test" / first["file"])
    assert meta["prompt"] == first["prompt"] and meta["seed"] == first["seed"]
    assert meta["recipe"]["name"] == "test" and meta["recipe_sha256"] == record["recipe_sha256"]
    assert meta["versions"]["torch"] == record["versions"]["torch"] != "absent"


def test_same_recipe_twice_gives_byte_identical_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_recipe_data(tmp_path / "a")
    run_recipe_data(tmp_path / "b")
    first, second = _pngs(tmp_path / "a" / "outputs" / "test"), _pngs(tmp_path / "b" / "outputs" / "test")
    assert first and first == second


def test_images_match_a_hand_written_diffusers_loop(tmp_path):
    record = run_recipe_data(tmp_path, {"generate": {"steps": 3, "seed": 5}})
    pipe = tiny_pipeline("unet")
    for image in record["images"]:
        expected = pipe(
            image["prompt"],
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(image["seed"]),
            output_type="pil",
        ).images[0]
        actual = Image.open(tmp_path / "outputs" / "test" / image["file"])
        assert np.array_equal(np.asarray(actual), np.asarray(expected))


def test_prompt_seeds_ids_and_images_per_prompt(tmp_path):
    prompts = ["a red circle", {"text": "a green square", "id": "green", "seed": 42}, "a blue triangle"]
    record = run_recipe_data(
        tmp_path,
        {"prompts": prompts, "generate": {"steps": 2, "seed": 10, "images_per_prompt": 2, "batch_size": 2}},
    )
    seeds = [(i["file"], i["seed"]) for i in record["images"]]
    assert seeds == [
        ("000-a-red-circle-0.png", 10),
        ("000-a-red-circle-1.png", 10),
        ("001-green-0.png", 42),
        ("001-green-1.png", 42),
        ("002-a-blue-triangle-0.png", 12),
        ("002-a-blue-triangle-1.png", 12),
    ]
    out = tmp_path / "outputs" / "test"
    assert (
        Image.open(out / "000-a-red-circle-0.png").tobytes()
        != Image.open(out / "000-a-red-circle-1.png").tobytes()
    )


def test_a_directory_holding_another_recipes_run_is_not_overwritten(tmp_path):
    run_recipe_data(tmp_path)
    before = _pngs(tmp_path / "outputs" / "test")
    with pytest.raises(UsageError, match="different recipe"):
        run_recipe_data(tmp_path, {"generate": {"steps": 2}})
    assert _pngs(tmp_path / "outputs" / "test") == before
    record = run_recipe_data(tmp_path, {"generate": {"steps": 2}}, overwrite=True)
    assert record["status"] == "complete"
    assert _pngs(tmp_path / "outputs" / "test") != before


class _InterruptAfter(RunObserver):
    def __init__(self, images: int):
        self.images = images

    def image_done(self, image):
        self.images -= 1
        if self.images == 0:
            raise KeyboardInterrupt


def test_interrupt_keeps_finished_images_and_resume_completes_identically(tmp_path):
    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry
    from dgrun.runner import Run, RunOptions
    from dgrun.testing import write_recipe

    data = recipe_data(prompts=["one", "two", "three"])
    (tmp_path / "clean").mkdir()
    run_recipe_data(tmp_path / "clean", {"prompts": ["one", "two", "three"]})
    path = write_recipe(tmp_path, data)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        Run(load_recipe(path), build_registry(), RunOptions(out=out), _InterruptAfter(1)).execute()
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "interrupted" and len(record["images"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000-one.png", "run.json"]
    done = Run(load_recipe(path), build_registry(), RunOptions(out=out, resume=True), RunObserver()).execute()
    assert done["status"] == "complete" and len(done["images"]) == 3
    assert _pngs(tmp_path / "out") == _pngs(tmp_path / "clean" / "outputs" / "test")


def test_unavailable_step_skips_or_fails_before_anything_is_written(tmp_path):
    flux = {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": 2}}
    step = {"attention_backend": {"backend": "flash"}}
    with pytest.raises(RunError, match="flash"):
        run_recipe_data(tmp_path, {**flux, "optimize": [step]})
    assert not (tmp_path / "outputs").exists()
    record = run_recipe_data(tmp_path, {**flux, "optimize": [step], "on_unavailable": "skip"})
    assert record["plan"][0]["status"] == "skipped" and "flash_attn" in record["plan"][0]["detail"]
    assert len(record["images"]) == 2


def test_attention_backend_list_records_the_fallback(tmp_path):
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:tiny-flux"},
            "generate": {"steps": 2},
            "optimize": [{"attention_backend": {"backend": ["flash_3", "flash", "native"]}}],
        },
    )
    step = record["plan"][0]
    assert step["status"] == "fell back" and "native" in step["detail"] and "flash_3" in step["detail"]


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("this compiler backend always fails")


def test_compile_failure_falls_back_to_eager_with_a_record_entry(tmp_path, monkeypatch):
    from torch._dynamo.backends import registry

    torch._dynamo.reset()
    # A recipe may name only known backends: make one of them fail (the recipe says `eager`).
    registry._lazy_import()
    monkeypatch.setitem(registry._COMPILER_FNS, "eager", _broken_backend)
    warnings = []

    class Collect(RunObserver):
        def warning(self, message):
            warnings.append(message)

    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry
    from dgrun.runner import Run, RunOptions
    from dgrun.testing import write_recipe

    data = recipe_data(optimize=[{"compile": {"backend": "eager"}}], generate={"steps": 2})
    path = write_recipe(tmp_path, data)
    record = Run(
        load_recipe(path), build_registry(), RunOptions(out=str(tmp_path / "o")), Collect()
    ).execute()
    step = record["plan"][0]
    assert step["status"] == "fell back" and step["detail"].startswith("fell back to eager")
    assert len(warnings) == 1 and "compile" in warnings[0]
    assert len(record["images"]) == 2

    data["optimize"] = [{"compile": {"backend": "eager", "on_unavailable": "fail"}}]
    path = write_recipe(tmp_path, data)
    torch._dynamo.reset()
    with pytest.raises(RunError, match="on_unavailable: fail"):
        Run(load_recipe(path), build_registry(), RunOptions(out=str(tmp_path / "p")), RunObserver()).execute()
    assert json.loads((tmp_path / "p" / "run.json").read_text())["status"] == "failed"


def test_step_on_the_wrong_model_kind_is_bad_input(tmp_path):
    with pytest.raises(RecipeError, match="FluxPipeline"):
        run_recipe_data(tmp_path, {"model": {"id": "dgrun:tiny-flux"}, "optimize": ["deepcache"]})
    assert not (tmp_path / "outputs").exists()


def test_unknown_hub_model_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match=r"cannot load 'nobody/no-such-model'.*built-in model"):
        run_recipe_data(tmp_path, {"model": {"id": "nobody/no-such-model"}})
    record = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert record["status"] == "failed" and "no-such-model" in record["error"]


def test_local_diffusers_directory_loads_with_the_ordinary_code(tmp_path):
    saved = tmp_path / "saved-model"
    tiny_pipeline("unet").save_pretrained(saved)
    record = run_recipe_data(tmp_path, {"model": {"id": str(saved)}, "generate": {"steps": 2}})
    assert record["model"]["kind"] == "unet" and len(record["images"]) == 2
