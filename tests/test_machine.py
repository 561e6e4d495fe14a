"""Training plumbing: the OpenMP wait policy follows what other processes do to the cores right now."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dgrun import machine

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")


@linux_only
def test_busy_cores_sees_another_process_spinning():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        busy = machine.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.7  # one core, give or take the sampling


def test_wait_policy_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert machine.choose_wait_policy() == "ACTIVE (from the environment)"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@linux_only
def test_wait_policy_turns_passive_when_the_cores_are_busy():
    """In a fresh interpreter (torch not loaded yet), with another process spinning on every core."""
    code = (
        "import os, dgrun.machine as k; print(k.choose_wait_policy()); "
        "print('policy', os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable)]
    try:
        time.sleep(0.3)
        command = [sys.executable, "-c", code]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert result.returncode == 0, result.stderr
    assert "policy PASSIVE" in result.stdout, result.stdout
