"""The context_parallel step (`dgrun.steps.parallel`): what it needs of the launch and the device, and its
planning rules. Planned only: running it needs CUDA and several ranks (data parallelism is in
test_distributed.py)."""

from __future__ import annotations

import pytest

from dgrun.errors import RecipeError
from dgrun.optimizer import Environment
from dgrun.testing import plan_steps

CPU = Environment(device="cpu", device_kind="cpu")
CUDA = Environment(device="cuda:0", device_kind="cuda")
CP = "  - context_parallel: {ulysses_degree: 2, ring_degree: 2}\n"


def test_context_parallel_needs_a_launch_of_the_right_size(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    step = plan_steps(tmp_path, CP, CUDA).steps[0]
    assert "world size = ulysses_degree × ring_degree = 4" in step.reason and "world size 1" in step.reason
    assert "torchrun --nproc_per_node 4" in step.reason
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert plan_steps(tmp_path, CP, CUDA).blocking() == []
    assert plan_steps(tmp_path, CP, CUDA).steps[0].params.ring_degree == 2
    on_cpu = plan_steps(tmp_path, CP, CPU).steps[0]
    assert "needs CUDA" in on_cpu.reason and "gloo" in on_cpu.reason


def test_context_parallel_planning_rules(tmp_path):
    with pytest.raises(RecipeError) as conflict:
        plan_steps(tmp_path, "  - cpu_offload\n" + CP, CUDA)
    assert "context_parallel" in str(conflict.value) and "cpu_offload" in str(conflict.value)
    with pytest.raises(RecipeError, match="context_parallel"):
        plan_steps(tmp_path, CP, CUDA, model="dgrun:tiny-sd")  # a UNet: no context-parallel plan
    with pytest.raises(RecipeError, match="at least 2"):
        plan_steps(tmp_path, "  - context_parallel: {ulysses_degree: 1}\n", CUDA)
    with pytest.raises(RecipeError, match="compile"):
        plan_steps(tmp_path, "  - compile\n" + CP, CUDA)  # compile comes after the attention rewrite
