"""What a run executes on: the thread policy, and the facts of the machine that decide the bits.

On CPU, images depend on the intra-op thread count (a 1-thread and a 2-thread run differ in some images),
so the record keeps it, and `reproduce` uses it again. The default count stays torch's, so a run on a busy
machine makes the same bits as on a quiet one; what changes with load is how idle OpenMP threads wait.
Spinning threads collapse when another process holds a core (the quickstart, measured on 2 cores with one
other busy process: 2.72 s/image spinning, 0.72 passive, 0.59 with one thread), so when other processes
keep the cores busy at start, OpenMP is told to wait passively; on idle cores spinning is faster.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

WAIT_POLICY = "OMP_WAIT_POLICY"
# How long a run samples the cores before choosing (training, which runs for half an hour, takes 1 s).
WAIT_SAMPLE_SECONDS = 0.3


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores other processes keep busy right now (this process sleeps while measuring); None off Linux.

    /proc/stat over a short window, not the load average: a pip install that ended a minute ago still
    lifts the 1-minute load average above 1 on an idle machine.
    """

    def sample() -> tuple[int, int, int]:
        lines = Path("/proc/stat").read_text().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0), cores  # total, idle + iowait

    try:
        total_0, idle_0, cores = sample()
        time.sleep(seconds)
        total_1, idle_1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_1 - total_0
    # The first line sums the cores /proc/stat lists, which a container may show more of than it may use.
    return 0.0 if elapsed <= 0 else (1 - (idle_1 - idle_0) / elapsed) * max(1, cores)


def choose_wait_policy(seconds: float = 1.0) -> str:
    """Passive OpenMP waiting when other processes keep the cores busy; must run before torch loads.

    The math, and so the images and weights, are the same either way. An OMP_WAIT_POLICY set by the user
    is left alone. Returns what was chosen and why, for the record.
    """
    if WAIT_POLICY in os.environ:
        return f"{os.environ[WAIT_POLICY]} (from the environment)"
    if "torch" in sys.modules:
        return "unchanged (torch already loaded)"
    busy = busy_cores(seconds)
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy < 0.5:
        return f"default: spin ({busy:.1f} cores busy with other work at start)"
    os.environ[WAIT_POLICY] = "PASSIVE"
    return f"PASSIVE ({busy:.1f} cores busy with other work at start)"


def runtime_facts(device: str, wait_policy: str | None = None) -> dict[str, Any]:
    """The settings besides versions that decide a run's bits: threads, CPU capability, determinism, GPU."""
    import torch

    facts: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": _cpu_capability(),
        "omp_wait_policy": wait_policy or os.environ.get(WAIT_POLICY, "default"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        facts["cuda"] = {
            "device_name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "cuda_version": torch.version.cuda,
            "driver_version": _driver_version(),
        }
    return facts


def _cpu_capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _driver_version() -> str | None:
    import torch

    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    try:
        version = int(getter()) if getter is not None else None
    except (RuntimeError, TypeError, ValueError):
        return None
    return None if version is None else f"{version // 1000}.{version % 1000 // 10}"


def runtime_differences(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Runtime facts that differ between a record and a new run, for a reproduction's drift report."""
    if not recorded or not current:
        return []
    changes = []
    for key in sorted(recorded):  # a PNG records only the facts that decide its bits
        if key == "omp_wait_policy":
            continue  # how idle threads wait does not change the math
        if recorded.get(key) != current.get(key):
            changes.append(f"{key}: {recorded.get(key)} → {current.get(key)}")
    return changes
