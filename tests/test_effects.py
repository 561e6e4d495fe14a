"""The record tells the truth: each step's `effect` is measured from counters during the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from dgrun import Optimizer, hookimpl
from dgrun.errors import RecipeError
from dgrun.testing import recipe_data, registered_plugin, run_recipe_data, write_recipe


def _step(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in record["plan"] if s["step"] == name)


# -------------------------------------------------------------------------------------------- compile
class PerCallState(Optimizer):
    """Like DeepCache: Python state that changes every denoiser call and decides what runs."""

    name = "per_call_state_test"

    def apply(self, pipe: Any, ctx: Any) -> None:
        unet = pipe.unet
        original = unet.forward
        state = {"step": 0}

        def forward(*args: Any, **kwargs: Any) -> Any:
            state["step"] += 1
            output = original(*args, **kwargs)
            if state["step"] % 7 == 1:  # dynamo guards on this int: a new value, a new compile
                return output
            return output

        unet.forward = forward


class _PerCallPlugin:
    @staticmethod
    @hookimpl
    def dgrun_register_optimizers(register: Any) -> None:
        register(PerCallState)


def test_a_recompile_storm_is_detected_and_warned(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    data = {"generate": {"steps": 4}, "optimize": ["per_call_state_test", {"compile": {"backend": "eager"}}]}
    with registered_plugin(_PerCallPlugin()), torch._dynamo.config.patch(recompile_limit=2):
        record = run_recipe_data(tmp_path, data)
    torch._dynamo.reset()
    compile_step = _step(record, "compile")
    effect = compile_step["effect"]
    assert effect["recompile_limit_hit"] is True and effect["recompilations"] >= 1
    assert any("recompile limit hit" in w for w in record["warnings"])
    on_disk = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert on_disk["warnings"] == record["warnings"]


def test_a_clean_compile_counts_one_graph_and_no_recompilation(tmp_path):
    torch._dynamo.reset()
    record = run_recipe_data(
        tmp_path, {"generate": {"steps": 3}, "optimize": [{"compile": {"backend": "eager"}}]}
    )
    torch._dynamo.reset()
    effect = _step(record, "compile")["effect"]
    assert effect["graphs"] >= 1 and effect["recompilations"] == 0 and not effect["recompile_limit_hit"]
    assert record["warnings"] == []


def test_deepcache_with_compile_is_refused_with_the_measured_reason(tmp_path):
    pytest.importorskip("DeepCache")
    with pytest.raises(RecipeError, match=r"conflicts with 'deepcache'.*recompile.*DeepCache alone"):
        run_recipe_data(tmp_path, {"optimize": ["deepcache", "compile"]})


# --------------------------------------------------------------------------------------------- caches
def test_a_cache_records_fewer_full_passes(tmp_path):
    data = {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": 8}}
    record = run_recipe_data(tmp_path, {**data, "optimize": [{"first_block_cache": {"threshold": 0.35}}]})
    effect = _step(record, "first_block_cache")["effect"]
    assert effect["denoiser_calls"] == 16  # 2 prompts x 8 steps, no CFG batch on FLUX
    assert 0 < effect["computed"] < effect["denoiser_calls"] and effect["cached"] == 16 - effect["computed"]


def test_a_cache_that_caches_nothing_is_recorded_as_no_effect(tmp_path):
    data = {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": 8}}
    record = run_recipe_data(tmp_path, {**data, "optimize": [{"first_block_cache": {"threshold": 1e-9}}]})
    step = _step(record, "first_block_cache")
    assert step["status"] == "no effect" and step["effect"]["cached"] == 0


def test_deepcache_counts_cached_steps(tmp_path):
    pytest.importorskip("DeepCache")
    record = run_recipe_data(
        tmp_path, {"generate": {"steps": 9}, "optimize": [{"deepcache": {"interval": 3}}]}
    )
    effect = _step(record, "deepcache")["effect"]
    assert effect["denoiser_calls"] == 18 and effect["computed"] == 6 and effect["cached"] == 12


# ------------------------------------------------------------------------------------------ attention
def test_attention_calls_are_counted_through_the_chosen_backend(tmp_path):
    data = {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": 2}}
    record = run_recipe_data(
        tmp_path, {**data, "optimize": [{"attention_backend": {"backend": "_native_math"}}]}
    )
    effect = _step(record, "attention_backend")["effect"]
    assert effect["backend"] == "_native_math" and effect["attention_modules"] == 4
    assert effect["calls_routed"] == 4 * 2 * 2  # modules x steps x prompts


def test_an_attention_backend_on_sd3_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = recipe_data(
        model={"id": "dgrun:default-dit"}, optimize=[{"attention_backend": {"backend": "native"}}]
    )
    write_recipe(tmp_path, data)
    from typer.testing import CliRunner

    from dgrun.cli import main

    result = CliRunner().invoke(main.__globals__["app"], ["check", "recipe.yaml"])
    assert result.exit_code == 2
    assert "JointAttnProcessor2_0" in result.output + (result.stderr or "")


def test_a_backend_that_fails_its_probe_falls_back_at_apply(tmp_path, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    broken = AttentionBackendName("_native_math")

    def fails(**kwargs: Any) -> Any:
        raise RuntimeError("this kernel needs fp16")

    monkeypatch.setitem(_AttentionBackendRegistry._backends, broken, fails)
    data = {"model": {"id": "dgrun:tiny-flux"}, "generate": {"steps": 1}}
    steps = [{"attention_backend": {"backend": ["_native_math", "native"]}}]
    record = run_recipe_data(tmp_path, {**data, "optimize": steps})
    step = _step(record, "attention_backend")
    assert step["status"] == "fell back" and "this kernel needs fp16" in step["detail"]
    assert step["effect"]["backend"] == "native" and step["effect"]["calls_routed"] > 0


# ----------------------------------------------------------------------------------------- VAE steps
def test_tiling_a_small_image_warns_about_seams(tmp_path):
    record = run_recipe_data(tmp_path, {"generate": {"steps": 1}, "optimize": ["vae_tiling"]})
    step = _step(record, "vae_tiling")
    assert step["effect"]["tiled_decodes"] == 2
    assert any("seams" in w for w in record["warnings"])


def test_slicing_a_batch_is_counted(tmp_path):
    record = run_recipe_data(
        tmp_path, {"generate": {"steps": 1, "batch_size": 2}, "optimize": ["vae_slicing"]}
    )
    step = _step(record, "vae_slicing")
    assert (
        step["status"] == "applied"
        and step["effect"]["image_decodes"] == 2
        and step["effect"]["decodes"] == 1
    )


# ------------------------------------------------------------------------------------- failed steps
class FailsToApply(Optimizer):
    name = "fails_to_apply_test"

    def apply(self, pipe: Any, ctx: Any) -> None:
        raise ValueError("no")


class _FailsPlugin:
    @staticmethod
    @hookimpl
    def dgrun_register_optimizers(register: Any) -> None:
        register(FailsToApply)


def test_a_step_that_fails_is_recorded_as_failed_not_planned(tmp_path):
    from dgrun.errors import RunError

    with registered_plugin(_FailsPlugin()), pytest.raises(RunError):
        run_recipe_data(tmp_path, {"optimize": ["fails_to_apply_test"]})
    record = json.loads((tmp_path / "outputs" / "test" / "run.json").read_text())
    assert record["plan"][0]["status"] == "failed" and "ValueError: no" in record["plan"][0]["detail"]


# ------------------------------------------------------------------------------------------ runtime
def test_the_record_holds_the_runtime_facts(tmp_path):
    record = run_recipe_data(tmp_path, {"generate": {"steps": 1, "threads": 1}})
    runtime = record["runtime"]
    assert runtime["threads"] == 1 and runtime["interop_threads"] >= 1
    assert runtime["cpu_capability"] and "deterministic_algorithms" in runtime
    assert "cuda" not in runtime
