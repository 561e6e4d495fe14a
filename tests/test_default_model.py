"""`dgrun:default`: the training script still trains, the evaluator is right, the shipped model adheres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgrun.models import BUILTIN_MODELS, builtin_model, shapes
from dgrun.models.architecture import WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
# A spread over all colours, shapes and backgrounds (each appears at least once as shape and background).
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a white circle on a red background",
    "a black square on a yellow background",
    "a blue triangle on a green background",
]


def test_evaluator_scores_the_generators_own_pictures_perfectly():
    rng = np.random.default_rng(123)
    pairs = []
    for colour, shape, background in shapes.combinations():
        for _ in range(2):
            spec = shapes.random_spec(rng)
            spec = shapes.ShapeSpec(colour, shape, background, spec.size, spec.x, spec.y)
            pairs.append((spec.prompt, shapes.draw(spec)))
    scores = shapes.score(pairs)
    assert min(scores[name] for name in shapes.ATTRIBUTES) >= 0.98, scores
    # Arrays in 0–1 (output_type="np") and at 32×32 are read the same way.
    prompt, image = pairs[0]
    assert all(shapes.check(prompt, np.asarray(image, dtype=np.float32) / 255).values())
    small = shapes.ShapeSpec("black", "triangle", "white")
    assert all(shapes.check(small.prompt, shapes.draw(small, image_size=32)).values())


def test_evaluator_is_not_fooled_by_the_wrong_picture():
    spec = shapes.ShapeSpec("red", "square", "blue")
    assert shapes.check("a red circle on a blue background", shapes.draw(spec)) == {
        "colour": True,
        "shape": False,
        "background": True,
    }
    plain = Image.new("RGB", (64, 64), shapes.COLOURS["green"])
    assert shapes.check("a red circle on a green background", plain) == {
        "colour": False,
        "shape": False,
        "background": True,
    }
    assert shapes.parse_prompt("a cat on a mat") is None
    with pytest.raises(ValueError, match="does not follow"):
        shapes.check("a cat on a mat", plain)


def test_data_is_seeded_and_keeps_shape_and_background_colours_apart():
    first, prompts = shapes.make_batch(np.random.default_rng(5), 8)
    again, same = shapes.make_batch(np.random.default_rng(5), 8)
    assert first.shape == (8, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and prompts == same
    assert len(shapes.combinations()) == 90
    assert all(colour != background for colour, _, background in shapes.combinations())


def test_catalogue_describes_the_shipped_models():
    for name, kind, cls in [("default", "unet", "StableDiffusionPipeline")]:
        model = builtin_model(f"dgrun:{name}")
        assert model is BUILTIN_MODELS[name]
        assert (model.kind.value, model.pipeline_class, model.native_size) == (kind, cls, 64)
        assert (WEIGHTS_DIR / name / "model_index.json").is_file()
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024


def test_training_script_runs_and_saves_loadable_pipelines(tmp_path):
    from dgrun.models.architecture import load_default, load_default_dit

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "dgrun.models.train", "--quick", "--out", str(out), "--work", str(work)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "adherence" in result.stdout and "saved" in result.stdout
    for load, name in [(load_default, "default"), (load_default_dit, "default-dit")]:
        pipe = load(directory=out / name)
        image = pipe("a red circle on a blue background", num_inference_steps=2).images[0]
        assert image.size == (64, 64)
        report = json.loads((out / name / "training.json").read_text())
        assert set(report["adherence"]) >= {"colour", "shape", "background"}
        assert report["provenance"]["torch"].startswith(torch.__version__.split("+")[0])
        assert report["provenance"]["threads"] >= 1 and report["provenance"]["cpu_capability"]


@pytest.mark.parametrize("model", ["dgrun:default", "dgrun:default-dit"])
def test_shipped_models_follow_prompts(tmp_path, model):
    """Measured on all 90 prompts: 1.00 / 1.00 / 1.00 (default), 1.00 / 0.96 / 1.00 (default-dit)."""
    from dgrun.testing import run_recipe_data

    recipe = {
        "model": {"id": model},
        "prompts": PROMPTS,
        "generate": {"steps": 20, "batch_size": len(PROMPTS)},
    }
    record = run_recipe_data(tmp_path, recipe)
    assert record["status"] == "complete"
    out = tmp_path / "outputs" / "test"
    pairs = [(image["prompt"], Image.open(out / image["file"])) for image in record["images"]]
    assert {image.size for _, image in pairs} == {(64, 64)}
    scores = shapes.score(pairs)
    assert scores["colour"] >= 0.8 and scores["background"] >= 0.8 and scores["shape"] >= 0.65, scores


def test_a_saved_pipeline_without_optional_components_loads_from_its_directory(tmp_path):
    """default-dit is saved without T5 (`text_encoder_3: [null, null]`): a plain `model.id: PATH` loads it."""
    from dgrun.testing import run_recipe_data

    directory = str(WEIGHTS_DIR / "default-dit")
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": directory},
            "generate": {"steps": 2},
            "prompts": ["a red circle on a blue background"],
        },
    )
    assert record["status"] == "complete"
    assert record["model"]["pipeline_class"] == "StableDiffusion3Pipeline"


def test_loading_the_shipped_model_prints_no_library_progress_bars(tmp_path):
    """transformers draws a "Loading weights" bar for each text encoder unless dgrun silences it."""
    recipe = (
        'dgrun: 1\nname: quiet\nmodel: {id: "dgrun:default"}\ngenerate: {steps: 2}\nprompts: [a red circle]\n'
    )
    (tmp_path / "r.yaml").write_text(recipe)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dgrun", "r.yaml"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs" / "quiet" / "run.json").is_file()
    chatter = result.stdout + result.stderr
    assert "Loading weights" not in chatter and "Loading pipeline components" not in chatter, chatter[-3000:]
