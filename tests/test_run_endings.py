"""Every way a run ends is recorded, and an output directory has one writer at a time.

SIGTERM ends a run like Ctrl-C (exit 143), a full disk records `failed` with exactly the images on disk,
a second run into a held directory is refused naming the holder, and `--resume` clears the temp files a
killed run left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dgrun.errors import UsageError
from dgrun.lock import LOCK_FILE, OutputLock
from dgrun.testing import recipe_data, run_recipe_data, write_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _many_prompts(directory: Path, count: int = 40, steps: int = 6) -> Path:
    prompts = [f"prompt number {i}" for i in range(count)]
    return write_recipe(directory, recipe_data(prompts=prompts, generate={"steps": steps}), "r.yaml")


def _wait_for_images(out: Path, process: subprocess.Popen, count: int = 1, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.png"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no image appeared"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ the lock
def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path, start_dgrun):
    _many_prompts(tmp_path, count=2, steps=1)
    out = tmp_path / "outputs" / "test"
    holder = OutputLock(out, ["dgrun", "r.yaml"])
    holder.acquire()
    try:
        second = start_dgrun(tmp_path, "r.yaml")
        _, stderr = second.communicate(timeout=120)
    finally:
        holder.release()
    assert second.returncode == 2, stderr
    assert f"pid {os.getpid()}" in stderr and "started 20" in stderr and "in use" in stderr
    assert not list(out.glob("*.png")) and not (out / "run.json").exists()
    # Released: the same command now runs, and leaves no lock file behind.
    third = start_dgrun(tmp_path, "r.yaml")
    _, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr
    assert not (out / LOCK_FILE).exists()


def test_two_concurrent_runs_one_writes_the_other_is_refused(tmp_path, start_dgrun):
    _many_prompts(tmp_path, count=400, steps=8)  # long enough to still run when the second one starts
    out = tmp_path / "outputs" / "test"
    first = start_dgrun(tmp_path, "r.yaml")
    _wait_for_images(out, first)
    second = start_dgrun(tmp_path, "r.yaml", "--overwrite")
    _, second_err = second.communicate(timeout=120)
    assert second.returncode == 2 and "in use by another dgrun run" in second_err, second_err
    assert first.poll() is None, "the first run must still be running (make it longer)"
    first.send_signal(signal.SIGINT)
    _, first_err = first.communicate(timeout=60)
    assert first.returncode == 130, first_err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["command"] == ["r.yaml"]
    assert {i["file"] for i in record["images"]} == {p.name for p in out.glob("*.png")}


def test_a_lock_held_by_a_killed_process_is_not_stale(tmp_path):
    out = tmp_path / "held"
    script = textwrap.dedent(
        f"""
        import time
        from dgrun.lock import OutputLock
        OutputLock(__import__("pathlib").Path({str(out)!r})).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UsageError, match=f"pid {holder.pid}"):
        OutputLock(out).acquire()
    holder.kill()
    holder.wait(timeout=30)
    lock = OutputLock(out)
    lock.acquire()  # the kernel dropped the dead holder's lock
    lock.release()


# ------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_is_recorded_like_ctrl_c_and_resume_finishes(tmp_path, start_dgrun):
    _many_prompts(tmp_path)
    out = tmp_path / "outputs" / "test"
    process = start_dgrun(tmp_path, "r.yaml")
    _wait_for_images(out, process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert time.monotonic() - sent < 30
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert {i["file"] for i in record["images"]} == {p.name for p in out.glob("*.png")}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    resumed = start_dgrun(tmp_path, "r.yaml", "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert len(json.loads((out / "run.json").read_text())["images"]) == 40


# ---------------------------------------------------------------------------------------- temp files
def test_resume_removes_the_temp_files_a_killed_run_left(tmp_path):
    run_recipe_data(tmp_path, {"generate": {"steps": 1}})
    out = tmp_path / "outputs" / "test"
    stale = [out / ".000-a-red-circle-on-a-blue-background.png.k3j2h1.tmp", out / ".run.json.abc_12.tmp"]
    for path in stale:
        path.write_bytes(b"half-written")
    keep = out / ".my-own-notes"
    keep.write_text("not dgrun's")
    run_recipe_data(tmp_path, {"generate": {"steps": 1}}, resume=True)
    assert not any(path.exists() for path in stale)
    assert keep.exists()


# ------------------------------------------------------------------------------------------ full disk
def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m t /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs user and mount namespaces (unshare) for a small tmpfs"
)
def test_a_full_disk_records_failed_with_exactly_the_images_on_disk(tmp_path):
    """A real full file system: a 2 MiB tmpfs in a private mount namespace, filled by the run itself."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _many_prompts(tmp_path, count=600, steps=1)
    command = (
        f"mount -t tmpfs -o size=2m dgrun-test {disk} && "
        f"{sys.executable} -m dgrun r.yaml --out {disk}/out --set generate.batch_size=25; "
        f"echo exit=$?; cp -r {disk}/out {tmp_path}/copied"
    )
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert "No space left on device" in result.stderr and "internal error" not in result.stderr
    assert "Traceback" not in result.stderr
    copied = tmp_path / "copied"
    record = json.loads((copied / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    on_disk = {p.name for p in copied.glob("*.png")}
    assert 0 < len(on_disk) < 600
    assert {i["file"] for i in record["images"]} == on_disk
    assert not [p.name for p in copied.iterdir() if p.name.endswith(".tmp")]
