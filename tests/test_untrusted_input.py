"""Recipes, bases, records and PNGs are untrusted: nothing in them executes, reads outside the recipe's
repository, or crashes dgrun. Each test plants what an attacker would and checks that it had no effect."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from dgrun.testing import recipe_data, run_recipe_data, write_recipe


def _trap(directory: Path) -> tuple[Path, Path]:
    """A script that leaves a marker file when anything runs it."""
    marker = directory / "EXECUTED"
    script = directory / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, marker


# ------------------------------------------------------------------------------- programs in recipes
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_compiler_named_in_inductor_flags_never_runs(tmp_path, monkeypatch, command, invoke):
    script, marker = _trap(tmp_path)
    monkeypatch.chdir(tmp_path)
    flags = {"cpp.cxx": str(script), "trace.debug_dir": str(tmp_path / "dbg"), "trace.enabled": True}
    write_recipe(tmp_path, recipe_data(optimize=[{"compile": {"inductor": flags}}]))
    code, output = invoke([command, "recipe.yaml"])
    assert code == 2, output
    assert "recipe.yaml:" in output and "cpp.cxx" in output and "trace.debug_dir" in output
    assert not marker.exists() and not (tmp_path / "dbg").exists()
    assert not (tmp_path / "outputs").exists()


def _png_with_chunk(path: Path, chunk: dict | bytes, compressed: bool = False) -> None:
    """A 1x1 PNG whose `dgrun` text chunk holds `chunk` (as dgrun writes it, or crafted)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode()
    if compressed:
        info.add(b"zTXt", b"dgrun\0\0" + zlib.compress(text, 9))
    else:
        info.add_text("dgrun", text.decode())
    Image.new("RGB", (1, 1)).save(path, format="PNG", pnginfo=info)


def test_a_png_carrying_a_compiler_flag_is_refused_by_reproduce(tmp_path, monkeypatch, invoke):
    script, marker = _trap(tmp_path)
    monkeypatch.chdir(tmp_path)
    recipe = recipe_data(optimize=[{"compile": {"params": {}, "inductor": {"cpp.cxx": str(script)}}}])
    recipe["optimize"] = [{"name": "compile", "params": {"inductor": {"cpp.cxx": str(script)}}}]
    _png_with_chunk(tmp_path / "shared.png", {"recipe": recipe, "prompt_index": 0, "image_index": 0})
    code, output = invoke(["reproduce", "shared.png"])
    assert code == 2, output
    assert "cpp.cxx" in output and "Traceback" not in output
    assert not marker.exists()
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------------ git, untrusted
def _hostile_repository(directory: Path, script: Path) -> None:
    """A folder with a .git whose config would make `git status` run `script` (fsmonitor, clean filter)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", str(directory)], check=True, env=env)
    git = ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t"]
    (directory / "keep.txt").write_text("x")
    subprocess.run([*git, "add", "keep.txt"], check=True, env=env)
    subprocess.run([*git, "commit", "-qm", "init"], check=True, env=env)
    (directory / ".gitattributes").write_text("* filter=evil\n")
    with open(directory / ".git" / "config", "a") as config:
        config.write(f'[core]\n\tfsmonitor = {script}\n[filter "evil"]\n\tclean = {script}\n')


def test_reproduce_never_runs_git_where_a_record_points(tmp_path, monkeypatch, invoke):
    run_dir = tmp_path / "work"
    run_dir.mkdir()
    record = run_recipe_data(run_dir, {"generate": {"steps": 2}, "prompts": ["a red circle"]})
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    script, marker = _trap(tmp_path)
    _hostile_repository(hostile, script)
    # The PNG sits in the hostile checkout, and the run.json claims its recipe lived there too.
    source = run_dir / "outputs" / "test"
    png = hostile / record["images"][0]["file"]
    png.write_bytes((source / record["images"][0]["file"]).read_bytes())
    data = json.loads((source / "run.json").read_text())
    data["recipe_file"] = str(hostile / "recipe.yaml")
    (hostile / "recipe.yaml").write_text("dgrun: 1\n")
    (hostile / "run.json").write_text(json.dumps(data))
    (hostile / data["images"][0]["file"]).write_bytes(png.read_bytes())
    monkeypatch.chdir(tmp_path)
    for target in (png, hostile / "run.json"):
        code, output = invoke(["reproduce", str(target), "--out", str(tmp_path / f"re-{target.suffix[1:]}")])
        assert code == 0, output
        new_record = json.loads((tmp_path / f"re-{target.suffix[1:]}" / "run.json").read_text())
        assert new_record["git"] is None
    assert not marker.exists()


def test_a_run_reads_its_commit_without_running_git(tmp_path, monkeypatch):
    script, marker = _trap(tmp_path)
    repository = tmp_path / "repo"
    repository.mkdir()
    _hostile_repository(repository, script)
    monkeypatch.chdir(repository)
    record = run_recipe_data(repository, {"generate": {"steps": 1}, "prompts": ["x"]})
    assert record["git"]["commit"] and len(record["git"]["commit"]) == 40
    assert not marker.exists()


# ----------------------------------------------------------------------------------- reading bounds
def _finishes(action, seconds: float = 20) -> None:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "reading the input hung"


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_recipe_paths_must_be_regular_files(tmp_path, monkeypatch, kind, invoke):
    monkeypatch.chdir(tmp_path)
    target = {"fifo": tmp_path / "pipe.yaml", "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    results: list = []
    _finishes(lambda: results.append(invoke(["check", str(target)])))
    code, output = results[0]
    assert code == 2 and "Traceback" not in output and f"{target}:1:1" in output


def test_a_recipe_over_the_size_limit_is_refused(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20))
    code, output = invoke(["check", "big.yaml"])
    assert code == 2 and "larger than" in output


def test_a_fifo_as_run_record_is_refused_by_reproduce(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "run.json")
    results: list = []
    _finishes(lambda: results.append(invoke(["reproduce", "run.json"])))
    assert results[0][0] == 2, results[0][1]


# ------------------------------------------------------------------------------- malformed records
@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["images"][0].update(prompt_index="0"), "images[0].prompt_index"),
        (lambda r: r["images"][0].update(prompt_index=-1), "images[0].prompt_index"),
        (lambda r: r.update(images={"file": "x.png"}), "images"),
        (lambda r: r["images"][0].update(file="../../etc/passwd"), "images[0].file"),
        (lambda r: r.update(recipe="not a mapping"), "recipe"),
        (lambda r: r.update(versions=["torch"]), "versions"),
    ],
)
def test_malformed_run_records_are_bad_input_naming_the_field(tmp_path, monkeypatch, change, field, invoke):
    monkeypatch.chdir(tmp_path)
    record = {
        "recipe": recipe_data(),
        "recipe_sha256": None,
        "versions": {},
        "images": [{"file": "000-x.png", "prompt_index": 0, "image_index": 0, "sha256": None}],
    }
    change(record)
    (tmp_path / "run.json").write_text(json.dumps(record))
    code, output = invoke(["reproduce", "run.json"])
    assert code == 2, output
    assert field in output and "Traceback" not in output and "internal error" not in output


@pytest.mark.parametrize(
    "chunk, message",
    [
        ({"recipe": recipe_data(), "prompt_index": 1.5}, "prompt_index"),
        ({"recipe": [1, 2]}, "recipe"),
    ],
)
def test_malformed_png_chunks_are_bad_input(tmp_path, monkeypatch, chunk, message, invoke):
    monkeypatch.chdir(tmp_path)
    _png_with_chunk(tmp_path / "x.png", chunk)
    code, output = invoke(["reproduce", "x.png"])
    assert code == 2 and message in output and "internal error" not in output, output


def test_an_oversized_compressed_chunk_is_refused_without_unpacking_it(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    _png_with_chunk(tmp_path / "bomb.png", b"[" + b" " * (64 << 20) + b"]", compressed=True)
    assert (tmp_path / "bomb.png").stat().st_size < 1 << 20
    code, output = invoke(["reproduce", "bomb.png"])
    assert code == 2, output
    assert "internal error" not in output and "Traceback" not in output


# ------------------------------------------------------------------------------------------ extends
def test_extends_reads_only_yaml_files_of_the_recipes_repository(tmp_path, monkeypatch, invoke):
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (tmp_path / "outside.yaml").write_text("name: secret-outside\n")
    (project / "notes.txt").write_text("name: secret-notes\n")
    monkeypatch.chdir(project)
    for target, message in [
        ("../../outside.yaml", "outside this recipe's repository"),
        ("../notes.txt", "is not a .yaml or .yml file"),
    ]:
        (project / "recipes" / "r.yaml").write_text(f"extends: {target}\nprompts: [x]\n")
        code, output = invoke(["check", "recipes/r.yaml"])
        assert code == 2 and message in output, output
        assert "secret" not in output


def test_a_git_work_tree_bounds_extends_from_nested_folders(tmp_path, monkeypatch, invoke):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "bases").mkdir()
    (project / "recipes" / "deep").mkdir(parents=True)
    (project / "bases" / "base.yaml").write_text("dgrun: 1\nmodel: {id: 'dgrun:tiny-sd'}\n")
    (project / "recipes" / "deep" / "r.yaml").write_text(
        "extends: ../../bases/base.yaml\nname: nested\nprompts: [x]\n"
    )
    monkeypatch.chdir(project)
    code, output = invoke(["check", "recipes/deep/r.yaml"])
    assert code == 0, output


def test_a_base_files_values_are_never_echoed(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(
        "dgrun: 1\nmodel: {id: 'dgrun:tiny-sd'}\ngenerate: {steps: 'sk-12345'}\n"
    )
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nname: x\nprompts: [x]\ngenerate: {seed: 'mine'}\n")
    code, output = invoke(["check", "r.yaml"])
    assert code == 2
    assert "base.yaml:3" in output and "sk-12345" not in output
    assert "'mine'" in output  # the user's own file is quoted back as before


def test_the_subprocess_cli_reports_a_recipe_from_a_fifo_quickly(tmp_path):
    os.mkfifo(tmp_path / "r.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "dgrun", "check", "r.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "regular" in result.stderr
