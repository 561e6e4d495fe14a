"""GPU-path defects found by reading the libraries' sources, each made impossible by a rule or a probe that
a CPU can check: the planner refuses the combination with the reason, before anything loads."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any, ClassVar

import pytest

from dgrun.errors import RecipeError
from dgrun.optimizer import ApplyContext, Environment
from dgrun.testing import plan_steps

CUDA = Environment(device="cuda", device_kind="cuda", cuda_capability=(9, 0), probed=True)


def _refused(tmp_path, steps: str, match: str, model: str = "dgrun:tiny-flux", **recipe: Any) -> None:
    with pytest.raises(RecipeError, match=match):
        plan_steps(tmp_path, steps, CUDA, model=model, **recipe)


def test_quanto_weights_cannot_be_group_offloaded(tmp_path):
    pytest.importorskip("optimum.quanto")
    steps = "  - quantize: {backend: quanto}\n  - group_offloading\n"
    _refused(tmp_path, steps, "group offloading .* cannot move quanto")


def test_torchao_int4_needs_bfloat16_activations(tmp_path):
    steps = "  - quantize: {backend: torchao, method: int4_weight_only}\n"
    _refused(tmp_path, steps, "bfloat16 activations; model.dtype is float32", dtype="float32")


def test_torchao_int4_needs_mslk(tmp_path):
    from dgrun.steps.quantize import Quantize

    params = Quantize.Params(backend="torchao", method="int4_weight_only")
    reason = Quantize.unavailable_reason(CUDA, params)
    assert (reason is None) == Environment.has_package("mslk")
    if reason:
        assert "mslk" in reason


@pytest.mark.parametrize(
    "steps, match",
    [
        ("  - compile: {mode: reduce-overhead, regional: true}\n", "regional compile calls each block"),
        ("  - first_block_cache\n  - compile: {mode: max-autotune}\n", "first_block_cache keeps outputs"),
        (
            "  - first_block_cache\n  - compile: {inductor: {triton.cudagraphs: true}}\n",
            "records CUDA graphs",
        ),
    ],
)
def test_cuda_graph_compiles_are_refused_where_outputs_would_be_overwritten(tmp_path, steps, match):
    _refused(tmp_path, steps, match)


def test_cuda_graphs_with_true_cfg_are_refused(tmp_path):
    _refused(tmp_path, "  - compile: {mode: reduce-overhead}\n", "true CFG", extra={"true_cfg_scale": 4.0})


def test_a_cuda_graph_compile_alone_is_fine(tmp_path):
    plan = plan_steps(tmp_path, "  - compile: {mode: reduce-overhead}\n", CUDA)
    assert plan.steps[0].name == "compile"


def test_flex_attention_needs_a_compile_after_it(tmp_path):
    _refused(tmp_path, "  - attention_backend: {backend: flex}\n", "flex attention without a later `compile`")
    plan = plan_steps(tmp_path, "  - attention_backend: {backend: flex}\n  - compile\n", CUDA)
    assert [s.name for s in plan.steps] == ["attention_backend", "compile"]


def test_layerwise_casting_must_come_after_fuse_qkv(tmp_path):
    _refused(tmp_path, "  - layerwise_casting\n  - fuse_qkv\n", "must come before 'layerwise_casting'")


def test_an_old_sageattention_is_not_usable(monkeypatch):
    from dgrun.steps import attention

    monkeypatch.setattr(Environment, "has_package", staticmethod(lambda name: True))
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.0.6" if name == "sageattention" else real(name))
    assert "2.1.1 or newer" in (attention.backend_unavailable("sage", CUDA) or "")
    monkeypatch.setattr(metadata, "version", lambda name: "2.2.0" if name == "sageattention" else real(name))
    assert attention.backend_unavailable("sage", CUDA) is None


def test_xdit_on_flux_refuses_negative_prompts(tmp_path):
    pytest.importorskip("dgrun_xdit")
    _refused(
        tmp_path,
        "  - xdit: {ulysses_degree: 2}\n",
        "ignores negative prompts",
        negative_prompt="blurry",
    )


def test_group_offloading_with_streams_records_one_block_per_group():
    from dgrun.steps.offload import GroupOffloading

    class Pipe:
        components: ClassVar[dict[str, Any]] = {}

        def enable_group_offload(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    step = GroupOffloading(GroupOffloading.Params(num_blocks_per_group=4, use_stream=True))
    detail = step.apply(Pipe(), ApplyContext(env=CUDA, model_kind=None))
    assert "1 block per group" in detail and "4 blocks" not in detail


def test_allocator_settings_are_exported_before_the_gpu_is_probed(monkeypatch):
    from dgrun.applying import export_process_environment
    from dgrun.plugins import build_registry
    from dgrun.recipe import StepSpec

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    previous = export_process_environment(
        [StepSpec(name="cuda_memory", params={"expandable_segments": True})], build_registry()
    )
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64,expandable_segments:True"
    assert previous == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
