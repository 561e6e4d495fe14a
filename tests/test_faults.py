"""Faults never cost a user their work: Ctrl-C at every phase, failing writes, failing plugins, OOM.

The subprocess tests install a small plugin the way a third party would (a distribution with an entry
point in the `dgrun` group, here a dist-info folder on PYTHONPATH) whose load and apply can be made slow,
so SIGINT arrives in a known phase.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dgrun import Optimizer, hookimpl
from dgrun.errors import RunError, UsageError
from dgrun.testing import recipe_data, registered_plugin, run_recipe_data

SLOW_PLUGIN = """
import os, time
from dgrun import Optimizer, hookimpl

def _mark(name):
    open(os.path.join(os.environ["DGRUN_TEST_MARKS"], name), "w").close()

class SlowStep(Optimizer):
    name = "slow_step"
    summary = "sleeps in apply (tests)"

    def apply(self, pipe, ctx):
        _mark("apply")
        time.sleep(float(os.environ.get("DGRUN_TEST_APPLY_SLEEP", "0")))
        return None

@hookimpl
def dgrun_register_optimizers(register):
    register(SlowStep)

@hookimpl
def dgrun_load_pipeline(model, device, dtype):
    if model.id != "slow:tiny-sd":
        return None
    _mark("load")
    time.sleep(float(os.environ.get("DGRUN_TEST_LOAD_SLEEP", "0")))
    from dgrun.models.tiny import build_tiny_sd
    return build_tiny_sd(dtype=dtype).to(device)
"""


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    dist_info = site / "dgrun_slow_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dgrun-slow-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[dgrun]\nslow = dgrun_slow_plugin\n")
    (site / "dgrun_slow_plugin.py").write_text(SLOW_PLUGIN)
    return site


def _recipe(directory: Path, **changes) -> Path:
    data = recipe_data(
        model={"id": "slow:tiny-sd"},
        optimize=["slow_step"],
        prompts=["one", "two", "three", "four", "five", "six"],
        generate={"steps": 8},
    )
    data.update(changes)
    path = directory / "r.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def start_with_plugin(plugin_site: Path, start_dgrun) -> Callable[..., subprocess.Popen]:
    """`start_with_plugin(directory, *args, **env)`: `dgrun r.yaml ARGS` in `directory`, the slow plugin
    installed; it leaves a file in `directory/marks` for each phase it reaches."""

    def start(directory: Path, *args: str, **env_extra: str) -> subprocess.Popen:
        marks = directory / "marks"
        marks.mkdir(exist_ok=True)
        env = {"PYTHONPATH": str(plugin_site), "DGRUN_TEST_MARKS": str(marks), **env_extra}
        return start_dgrun(directory, "r.yaml", *args, **env)

    return start


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _interrupt(process: subprocess.Popen) -> str:
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    # Seconds when the machine is idle; the bound leaves room for a loaded 2-core CI machine.
    assert time.monotonic() - sent < 30, "Ctrl-C must stop a run within seconds"
    assert "Traceback" not in stderr
    return stderr


def _assert_clean(out: Path) -> dict:
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary file left behind"
    assert {i["file"] for i in record["images"]} == {p.name for p in out.glob("*.png")}
    return record


@pytest.mark.parametrize("phase", ["load", "apply"])
def test_ctrl_c_during_load_or_apply(phase, tmp_path, start_with_plugin):
    _recipe(tmp_path)
    sleep = {"DGRUN_TEST_LOAD_SLEEP" if phase == "load" else "DGRUN_TEST_APPLY_SLEEP": "60"}
    process = start_with_plugin(tmp_path, **sleep)
    _wait_for(tmp_path / "marks" / phase, process)
    _interrupt(process)
    record = _assert_clean(tmp_path / "outputs" / "test")
    assert record["images"] == []


def test_ctrl_c_mid_images_then_resume_is_byte_identical(tmp_path, start_with_plugin):
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    _recipe(clean_dir)
    clean = start_with_plugin(clean_dir)
    _, stderr = clean.communicate(timeout=300)
    assert clean.returncode == 0, stderr

    _recipe(tmp_path)
    out = tmp_path / "outputs" / "test"
    process = start_with_plugin(tmp_path)
    _wait_for(out / "000-one.png", process)
    _interrupt(process)
    record = _assert_clean(out)
    assert 1 <= len(record["images"]) < 6
    resumed = start_with_plugin(tmp_path, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    expected = {p.name: p.read_bytes() for p in (clean_dir / "outputs" / "test").glob("*.png")}
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == expected
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_ctrl_c_during_compilation(tmp_path, start_with_plugin):
    _recipe(tmp_path, optimize=["compile"], generate={"steps": 4, "warmup": 1}, model={"id": "dgrun:tiny-sd"})
    out = tmp_path / "outputs" / "test"
    process = start_with_plugin(tmp_path)
    deadline = time.monotonic() + 240
    while True:  # the plan records compile as applied just before the first (compiling) call
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        record_path = out / "run.json"
        if record_path.exists():
            try:
                plan = json.loads(record_path.read_text())["plan"]
            except ValueError:
                plan = []
            if plan and plan[0]["status"] == "applied":
                break
        time.sleep(0.05)
    time.sleep(1.0)  # inside torch.compile's first call now
    _interrupt(process)
    _assert_clean(out)


def test_output_path_that_cannot_be_created_fails_before_generation(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(UsageError, match="cannot create output directory"):
        run_recipe_data(tmp_path, out=str(tmp_path / "blocker" / "run"))


def test_failing_write_keeps_finished_images_and_the_record(tmp_path, monkeypatch):
    from dgrun import runner

    written = []
    real_write = runner.write_png

    def write_then_fill_disk(path, image, info):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real_write(path, image, info)

    monkeypatch.setattr(runner, "write_png", write_then_fill_disk)
    with pytest.raises(RunError, match="No space left on device"):
        run_recipe_data(tmp_path, {"generate": {"steps": 2}})
    out = tmp_path / "outputs" / "test"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert [p.name for p in out.glob("*.png")] == [written[0].name]
    assert len(record["images"]) == 1


class RaisesInApply(Optimizer):
    name = "raises_in_apply"

    def apply(self, pipe, ctx):
        raise ValueError("the plugin's own bug")


class RunsOutOfMemory(Optimizer):
    name = "runs_out_of_memory"

    def apply(self, pipe, ctx):
        def forward(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        pipe.unet.forward = forward


@hookimpl
def _register_faulty(register):
    register(RaisesInApply)
    register(RunsOutOfMemory)


class _Plugin:
    dgrun_register_optimizers = staticmethod(_register_faulty)


def test_plugin_raising_in_apply_names_the_plugin_and_step(tmp_path):
    with registered_plugin(_Plugin(), distribution="dgrun-faulty"), pytest.raises(RunError) as error:
        run_recipe_data(tmp_path, {"optimize": ["raises_in_apply"]})
    assert "raises_in_apply" in str(error.value) and "dgrun-faulty" in str(error.value)
    assert "the plugin's own bug" in str(error.value)
    with registered_plugin(_Plugin(), distribution="dgrun-faulty"):
        record = run_recipe_data(
            tmp_path, {"optimize": [{"raises_in_apply": {"on_unavailable": "skip"}}]}, overwrite=True
        )
    assert record["plan"][0]["status"] == "skipped" and "the plugin's own bug" in record["plan"][0]["detail"]


def test_out_of_memory_suggests_the_memory_steps_and_keeps_the_record(tmp_path):
    with registered_plugin(_Plugin(), distribution="dgrun-faulty"), pytest.raises(RunError) as error:
        run_recipe_data(tmp_path, {"optimize": ["runs_out_of_memory"]})
    message = str(error.value)
    assert "out of memory" in message and "vae_tiling" in message and "group_offloading" in message
    record = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert record["status"] == "failed" and "vae_tiling" in record["error"]


def test_debug_flag_shows_the_traceback_of_a_failing_plugin(tmp_path, plugin_site, start_with_plugin):
    plugin = plugin_site / "dgrun_slow_plugin.py"
    plugin.write_text(plugin.read_text().replace('_mark("apply")', "raise ValueError('broken apply')"))
    _recipe(tmp_path)
    for args, shows in (((), False), (("--debug",), True)):
        process = start_with_plugin(tmp_path, *args, "--overwrite")
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1
        assert "dgrun-slow-plugin" in stderr and "broken apply" in stderr
        assert ("Traceback" in stderr) is shows


def test_trust_remote_code_needs_the_flag_and_is_recorded(tmp_path):
    record = run_recipe_data(tmp_path, {"model": {"id": "dgrun:tiny-sd", "trust_remote_code": True}})
    assert record["trust_remote_code"] == {"recipe": True, "command_line": False, "effective": False}
