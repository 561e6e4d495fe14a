"""`dgrun RECIPE` as a user runs it: a real subprocess, progress and summary, Ctrl-C, resume."""

from __future__ import annotations

import json
import signal
import time

RECIPE = """\
dgrun: 1
name: cli-run
model: {id: "dgrun:tiny-sd"}
generate: {steps: 8}
optimize: [tf32, vae_slicing]
prompts: [one, two, three, four, five, six]
"""


def test_run_prints_progress_and_a_closing_table_and_writes_outputs(tmp_path, start_dgrun):
    (tmp_path / "r.yaml").write_text(RECIPE.replace("three, four, five, six", "three"))
    process = start_dgrun(tmp_path, "r.yaml")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "generating" in stdout and "3/3" in stdout
    assert "vae_slicing" in stdout and "applied" in stdout and "000-one.png" in stdout
    record = json.loads((tmp_path / "outputs" / "cli-run" / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 3
    assert record["command"] == ["r.yaml"]


def test_ctrl_c_exits_130_keeps_finished_images_and_resume_completes(tmp_path, start_dgrun):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "outputs" / "cli-run"
    process = start_dgrun(tmp_path, "r.yaml")
    deadline = time.monotonic() + 240
    while not (out / "000-one.png").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no image appeared"
        time.sleep(0.05)
    interrupted_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - interrupted_at < 30  # seconds when idle; room for a loaded machine
    assert "interrupted" in stderr and "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    kept = {i["file"] for i in record["images"]}
    assert kept and kept == {p.name for p in out.glob("*.png")}

    resumed = start_dgrun(tmp_path, "r.yaml", "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resuming" in stdout
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 6
