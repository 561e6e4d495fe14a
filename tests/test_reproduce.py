"""`dgrun reproduce` from run.json and from a lone PNG: identical runs pass, tampered images drift."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from dgrun.cli import app
from dgrun.records import PNG_CHUNK
from dgrun.reproduce import Target, check_image, read_origin
from dgrun.testing import recipe_data, run_recipe_data, write_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny UNet with one step applied (so the record's steps must round-trip)."""
    directory = tmp_path_factory.mktemp("run")
    run_recipe_data(directory, {"generate": {"steps": 2, "batch_size": 2}, "optimize": ["vae_slicing"]})
    return directory / "outputs" / "test"


def _reproduce(*args: str) -> object:
    return CliRunner().invoke(app, ["reproduce", *args])


def _tamper(path: Path) -> None:
    """Change one pixel and keep the dgrun chunk, as an edited or corrupted copy would."""
    with Image.open(path) as image:
        text = image.text[PNG_CHUNK]
        pixels = image.convert("RGB")
    value = pixels.getpixel((3, 3))
    pixels.putpixel((3, 3), tuple(c - 60 if c > 127 else c + 60 for c in value))
    info = PngInfo()
    info.add_text(PNG_CHUNK, text)
    pixels.save(path, format="PNG", pnginfo=info)


def test_reproduce_of_a_fresh_run_is_identical(run_dir, tmp_path):
    result = _reproduce(str(run_dir / "run.json"), "--out", str(tmp_path / "again"))
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long temporary paths at 80 columns
    assert output.count("identical") == 2
    assert "reproduced: 2 of 2 images match" in output
    assert "versions: same as recorded" in output
    new_record = json.loads((tmp_path / "again" / "run.json").read_text())
    assert new_record["status"] == "complete" and len(new_record["images"]) == 2


def test_a_tampered_image_and_changed_versions_are_drift(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "run.json").read_text())
    record["versions"]["diffusers"] = "0.0.1"
    (copy / "run.json").write_text(json.dumps(record))
    _tamper(copy / record["images"][1]["file"])

    result = _reproduce(str(copy / "run.json"), "--out", str(tmp_path / "again"))
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "drift: 1 of 2 images differ" in output
    assert "differs from its recorded sha256" in output
    assert "diffusers: 0.0.1 →" in output


def test_reproduce_from_a_lone_copied_png(run_dir, tmp_path):
    elsewhere = tmp_path / "mail" / "picture.png"
    elsewhere.parent.mkdir()
    shutil.copy(next(run_dir.glob("001-*.png")), elsewhere)
    origin = read_origin(elsewhere)
    assert origin.kind == "image" and [t.prompt_index for t in origin.targets] == [1]

    result = _reproduce(str(elsewhere), "--out", str(tmp_path / "again"))
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long temporary paths at 80 columns
    assert "1 image to compare" in output
    assert "reproduced: 1 of 1 images match" in output


def test_tolerance_accepts_small_differences_only(run_dir, tmp_path):
    recorded = tmp_path / "recorded.png"
    shutil.copy(next(run_dir.glob("000-*.png")), recorded)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    shutil.copy(recorded, new_dir / "000.png")
    _tamper(new_dir / "000.png")
    new = {"file": "000.png", "sha256": "not the same"}
    target = Target(0, 0, "recorded.png", recorded, None)
    strict = check_image(target, new, new_dir, tolerance=None)
    assert strict.status == "drift" and strict.max_abs_diff == 60 and 40 < strict.psnr_db < 80
    assert check_image(target, new, new_dir, tolerance=40.0).status == "within tolerance"
    assert check_image(target, new, new_dir, tolerance=90.0).status == "drift"


def test_files_that_are_not_dgrun_records_are_bad_input(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "other.json").write_text("{}")
    for path in ("plain.png", "other.json", "missing.json"):
        result = _reproduce(str(tmp_path / path))
        assert result.exit_code == 2, result.output
    assert "no dgrun chunk" in " ".join(_reproduce(str(tmp_path / "plain.png")).output.split())


def test_reproducing_a_png_remakes_only_that_image(run_dir, tmp_path):
    png = sorted(run_dir.glob("*.png"))[1]
    result = _reproduce(str(png), "--out", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    made = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    # batch_size 2: the call that made it also made its batch neighbour, nothing more.
    record = json.loads((tmp_path / "one" / "run.json").read_text())
    assert png.name in made and len(record["images"]) == len(made) <= 2


def _dgrun(directory: Path, *args: str, threads: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run(
        [sys.executable, "-m", "dgrun", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a default thread count above 1")
def test_a_one_thread_run_reproduces_exactly_with_default_threads(tmp_path):
    prompts = [f"prompt {i}" for i in range(5)]
    write_recipe(tmp_path, recipe_data(prompts=prompts, generate={"steps": 4}), "r.yaml")
    first = _dgrun(tmp_path, "r.yaml", threads="1")
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert record["runtime"]["threads"] == 1
    again = _dgrun(tmp_path, "reproduce", "outputs/test/run.json", "--out", "again", threads=None)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reproduced: 5 of 5" in again.stdout
    assert json.loads((tmp_path / "again" / "run.json").read_text())["runtime"]["threads"] == 1
    forced = _dgrun(
        tmp_path, "reproduce", "outputs/test/run.json", "--out", "forced", "--threads", "2", threads=None
    )
    assert json.loads((tmp_path / "forced" / "run.json").read_text())["runtime"]["threads"] == 2
    if forced.returncode != 0:  # the thread count changed some bits: the report says which fact differs
        assert "threads: 1 → 2" in forced.stdout
