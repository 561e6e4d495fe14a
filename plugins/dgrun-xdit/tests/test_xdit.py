"""The `xdit` plugin step: params, the availability gate, planning rules, DG_XDIT_* translation, call routing.

xfuser needs a CUDA build of PyTorch (0.7 imports triton), so nothing here runs xDiT itself; what these
tests pin down is everything dgrun decides before and around it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import dgrun_xdit
import pytest
from dgrun_xdit import (
    Xdit,
    XditParams,
    ignored_environment,
    params_from_environment,
    recipe_entry,
    route_calls_through,
    xfuser_arguments,
)
from pydantic import ValidationError

from dgrun.errors import RecipeError, UsageError
from dgrun.optimizer import Environment
from dgrun.recipe import GenerateSpec
from dgrun.testing import plan_steps

CPU = Environment(device="cpu", device_kind="cpu")
CUDA = Environment(device="cuda:0", device_kind="cuda")
USP = "  - xdit: {ulysses_degree: 2, ring_degree: 2, data_parallel_degree: 2}\n"
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


@pytest.fixture
def xfuser_installed(monkeypatch):
    """Planning as on a GPU machine with xfuser installed and importable."""
    real = Environment.has_package
    monkeypatch.setattr(Environment, "has_package", staticmethod(lambda name: name == "xfuser" or real(name)))
    monkeypatch.setattr(dgrun_xdit, "_import_problem", lambda: None)
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _launch(monkeypatch, world: int, rank: int = 0) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


# ------------------------------------------------------------------------------------------- params
def test_degrees_multiply_into_the_launch_size_and_the_group_that_makes_an_image():
    params = XditParams(ulysses_degree=4, use_cfg_parallel=True, data_parallel_degree=2)
    assert params.ranks_per_image == 8 and params.world_size == 16
    assert params.degree_formula() == "data_parallel_degree 2 × cfg 2 × ulysses_degree 4 = 16"
    step = Xdit(params)
    assert step.ranks_per_image == 8
    assert step.image_rank_in_group == 7  # xDiT leaves the images on the group's last rank
    assert Xdit(XditParams(pipefusion_parallel_degree=2, use_parallel_vae=True)).image_rank_in_group == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "every degree is 1"),
        ({"data_parallel_degree": 4}, "dgrun runs data parallelism itself"),
        ({"ulysses_degree": 2, "num_pipeline_patch": 4}, "num_pipeline_patch only applies"),
        (
            {"ulysses_degree": 2, "data_parallel_degree": 2, "use_parallel_vae": True},
            "data_parallel_degree 1",
        ),
        ({"ulysses_degree": 0}, "greater than or equal to 1"),
    ],
)
def test_params_that_cannot_work_are_refused(params, message):
    with pytest.raises(ValidationError, match=message):
        XditParams(**params)


def test_xfuser_gets_the_degrees_and_the_shape_of_the_calls_to_come():
    params = XditParams(pipefusion_parallel_degree=2, num_pipeline_patch=8, warmup_steps=2)
    generate = GenerateSpec(steps=12, batch_size=3, guidance_scale=4.0)
    arguments = xfuser_arguments(params, 64, 48, generate)
    assert arguments["pipefusion_parallel_degree"] == 2 and arguments["num_pipeline_patch"] == 8
    assert arguments["warmup_steps"] == 2 and arguments["ulysses_degree"] == 1
    assert (arguments["width"], arguments["height"], arguments["num_inference_steps"]) == (64, 48, 12)
    assert arguments["prompt"] == ["", "", ""]  # xDiT's warm-up call uses the recipe's batch size
    assert arguments["guidance_scale"] == 4.0
    assert xfuser_arguments(params, 64, 64, GenerateSpec())["prompt"] == ""


# ------------------------------------------------------------------------------- availability gate
def test_without_xfuser_the_step_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(Environment, "has_package", staticmethod(lambda name: name != "xfuser"))
    plan = plan_steps(tmp_path, USP, CUDA)
    assert plan.blocking() == plan.steps  # recipes default to on_unavailable: fail
    reason = plan.steps[0].reason
    assert "needs the package xfuser" in reason and "dgrun-xdit[xfuser]" in reason


def test_an_xfuser_that_does_not_import_is_reported_at_run_time(tmp_path, xfuser_installed):
    problem = "ModuleNotFoundError: No module named 'triton'"
    xfuser_installed.setattr(dgrun_xdit, "_import_problem", lambda: problem)
    probed = Environment(device="cuda:0", device_kind="cuda", probed=True)
    reason = plan_steps(tmp_path, USP, probed).steps[0].reason
    assert "does not import" in reason and "triton" in reason and "CUDA build of PyTorch" in reason
    # `dgrun check` does not import torch or xfuser: there the package being installed is enough
    _launch(xfuser_installed, 8)
    assert plan_steps(tmp_path, USP, CUDA).blocking() == []


def test_the_step_needs_cuda_and_a_launch_of_the_right_size(tmp_path, xfuser_installed):
    on_cpu = plan_steps(tmp_path, USP, CPU).steps[0]
    assert "needs CUDA" in on_cpu.reason and "NCCL" in on_cpu.reason
    alone = plan_steps(tmp_path, USP, CUDA).steps[0]
    assert "data_parallel_degree 2 × ulysses_degree 2 × ring_degree 2 = 8" in alone.reason
    assert "torchrun --nproc_per_node 8" in alone.reason and "world size 1" in alone.reason
    _launch(xfuser_installed, 4, rank=3)
    assert "world size 4" in plan_steps(tmp_path, USP, CUDA).steps[0].reason
    _launch(xfuser_installed, 8, rank=5)
    plan = plan_steps(tmp_path, USP, CUDA)
    assert plan.blocking() == [] and plan.steps[0].reason is None


def test_a_recipe_may_let_xdit_be_skipped_where_it_cannot_run(tmp_path, xfuser_installed):
    steps = "  - xdit: {ulysses_degree: 2, on_unavailable: skip}\n"
    plan = plan_steps(tmp_path, steps, CPU)
    assert plan.blocking() == [] and "needs CUDA" in plan.steps[0].outlook()


# ---------------------------------------------------------------------------------- planning rules
@pytest.mark.parametrize(
    "other",
    ["cpu_offload", "group_offloading", "compile", "first_block_cache", "xformers", "attention_backend"],
)
def test_xdit_excludes_what_the_compatibility_table_excludes(tmp_path, xfuser_installed, other):
    with pytest.raises(RecipeError) as conflict:
        plan_steps(tmp_path, USP + f"  - {other}\n", CUDA)
    assert "xdit" in str(conflict.value) and other in str(conflict.value)


def test_xdit_and_context_parallel_are_one_parallelism_too_many(tmp_path, xfuser_installed):
    with pytest.raises(RecipeError, match="context_parallel"):
        plan_steps(tmp_path, USP + "  - context_parallel: {ulysses_degree: 2}\n", CUDA)


def test_module_rewrites_come_before_xdit_wraps_the_pipeline(tmp_path, xfuser_installed):
    with pytest.raises(RecipeError) as order:
        plan_steps(tmp_path, USP + "  - fuse_qkv\n", CUDA)
    assert "fuse_qkv" in str(order.value) and "before" in str(order.value)
    _launch(xfuser_installed, 8)
    plan = plan_steps(tmp_path, "  - fuse_qkv\n  - vae_tiling\n" + USP, CUDA)
    assert plan.blocking() == [] and [s.name for s in plan.ordered()] == ["fuse_qkv", "vae_tiling", "xdit"]


# --------------------------------------------------------------------------------- DG_XDIT_* settings
def test_the_seed_settings_translate_into_recipe_params():
    environ = {"DG_XDIT_ULYSSES_DEGREE": "4", "DG_XDIT_DATA_PARALLEL_DEGREE": "2", "PATH": "/bin"}
    assert params_from_environment(environ) == {"data_parallel_degree": 2, "ulysses_degree": 4}
    assert recipe_entry(environ) == "- xdit: {data_parallel_degree: 2, ulysses_degree: 4}"
    assert params_from_environment({"DG_XDIT_USE_CFG_PARALLEL": "true"}) == {"use_cfg_parallel": True}
    with pytest.raises(UsageError, match="DG_XDIT_ULYSSES is not an xdit param"):
        params_from_environment({"DG_XDIT_ULYSSES": "4"})
    with pytest.raises(UsageError, match="expected a whole number"):
        params_from_environment({"DG_XDIT_RING_DEGREE": "two"})
    with pytest.raises(UsageError, match="every degree is 1"):
        recipe_entry({"DG_XDIT_RING_DEGREE": "1"})


def test_environment_settings_that_disagree_with_the_recipe_are_named():
    params = XditParams(ulysses_degree=2)
    assert ignored_environment(params, {"DG_XDIT_ULYSSES_DEGREE": "2"}) == []
    assert ignored_environment(params, {"DG_XDIT_ULYSSES_DEGREE": "4"}) == ["DG_XDIT_ULYSSES_DEGREE=4"]


def test_the_translation_command_prints_an_entry_that_plans_to_the_same_params(tmp_path, xfuser_installed):
    env = {**os.environ, "DG_XDIT_ULYSSES_DEGREE": "4", "DG_XDIT_DATA_PARALLEL_DEGREE": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "dgrun_xdit"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "torchrun --nproc_per_node 8" in done.stdout
    entry = next(line for line in done.stdout.splitlines() if line.strip().startswith("- xdit"))
    _launch(xfuser_installed, 8)
    step = plan_steps(tmp_path, f"  {entry.strip()}\n", CUDA).steps[0]
    assert step.params == XditParams(ulysses_degree=4, data_parallel_degree=2)
    empty = {k: v for k, v in os.environ.items() if not k.startswith("DG_XDIT_")}
    missing = subprocess.run(
        [sys.executable, "-m", "dgrun_xdit"], env=empty, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no DG_XDIT_* variables" in missing.stderr


# ----------------------------------------------------------------------------------- call routing
def test_calls_go_through_the_engine_and_the_engine_reaches_the_pipeline():
    torch = pytest.importorskip("torch")
    from dgrun.testing import generate_array, tiny_pipeline

    pipe, untouched = tiny_pipeline("transformer"), tiny_pipeline("transformer")
    expected = generate_array(untouched, "a red circle", 2)
    seen = []

    def engine(*args, **kwargs):  # like xDiT's naive path: call the wrapped pipeline itself
        seen.append(args[0])
        return pipe(*args, **kwargs)

    route_calls_through(pipe, engine)
    assert type(pipe).__name__ == type(untouched).__name__ and type(pipe) is not type(untouched)
    result = generate_array(pipe, "a red circle", 2)
    assert seen == ["a red circle"] and torch.equal(torch.from_numpy(result), torch.from_numpy(expected))
    generate_array(untouched, "a red circle", 2)
    assert len(seen) == 1  # another pipeline of the same class is not routed
