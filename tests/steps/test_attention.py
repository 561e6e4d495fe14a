"""Attention steps (`dgrun.steps.attention`): fuse_qkv, attention_backend and xformers.

Each test shows what the step changed in the pipeline (fused projections, the backend each attention
module routes to), counts calls to prove the changed path really runs, and compares the images (float
arrays on a 0-1 scale from a fixed seed) with an untouched pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.optimizer import Environment, StepResult  # noqa: E402
from dgrun.steps.attention import (  # noqa: E402
    BACKENDS,
    AttentionBackend,
    FuseQkv,
    Xformers,
    backend_unavailable,
)
from dgrun.testing import (  # noqa: E402
    apply_context,
    count_calls,
    generate_array,
    plan_problem,
    run_recipe_data,
    tiny_pipeline,
)

PROMPT = "a red circle on a blue background"
STEPS = 4
CPU = Environment(device="cpu", device_kind="cpu")


def _attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]


# --------------------------------------------------------------------------------------------- fuse_qkv
def test_fuse_qkv_fuses_the_transformer_attention(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    attentions = _attention_modules(pipe.transformer)
    assert len(attentions) == 4
    assert not any(getattr(a, "fused_projections", False) or hasattr(a, "to_qkv") for a in attentions)

    detail = FuseQkv(FuseQkv.Params()).apply(pipe, apply_context("transformer"))

    assert detail == "fused in transformer"
    assert all(a.fused_projections and isinstance(a.to_qkv, torch.nn.Linear) for a in attentions)
    # The double-stream blocks also fuse the text stream's projections.
    assert all(hasattr(block.attn, "to_added_qkv") for block in pipe.transformer.transformer_blocks)
    first = attentions[0]
    with count_calls(first.to_qkv) as fused_calls, count_calls(first.to_q) as unfused_calls:
        image = generate_array(pipe, PROMPT, STEPS)
    assert fused_calls[0] == 4 and unfused_calls[0] == 0  # the fused matmul replaced the separate ones
    np.testing.assert_allclose(image, baseline("transformer", PROMPT, STEPS), atol=1e-4, rtol=0)


def test_fuse_qkv_fuses_the_unet_attention(baseline) -> None:
    pipe = tiny_pipeline("unet")
    assert hasattr(pipe.unet, "fuse_qkv_projections")
    processors_before = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert "FusedAttnProcessor2_0" not in processors_before

    assert FuseQkv(FuseQkv.Params()).apply(pipe, apply_context("unet")) == "fused in unet"

    attentions = _attention_modules(pipe.unet)
    self_attention = [a for a in attentions if not a.is_cross_attention]
    cross_attention = [a for a in attentions if a.is_cross_attention]
    assert self_attention and cross_attention
    assert all(a.fused_projections for a in attentions)
    assert all(isinstance(a.to_qkv, torch.nn.Linear) for a in self_attention)
    assert all(isinstance(a.to_kv, torch.nn.Linear) for a in cross_attention)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    with count_calls(self_attention[0].to_qkv) as fused_calls:
        image = generate_array(pipe, PROMPT, STEPS)
    assert fused_calls[0] == 4  # CFG runs both halves in one batch: one call per step
    np.testing.assert_allclose(image, baseline("unet", PROMPT, STEPS), atol=1e-4, rtol=0)


def test_fuse_qkv_names_components_it_cannot_fuse() -> None:
    pipe = tiny_pipeline("unet")
    with pytest.raises(RuntimeError, match=r"text_encoder.*cannot fuse"):
        FuseQkv(FuseQkv.Params(components=["text_encoder"])).apply(pipe, apply_context("unet"))
    with pytest.raises(RuntimeError, match="no component 'transformer'"):
        FuseQkv(FuseQkv.Params(components=["transformer"])).apply(pipe, apply_context("unet"))


# ------------------------------------------------------------------------------------ attention_backend
def _backends(pipe) -> set[object]:
    return {
        getattr(m.processor, "_attention_backend", "missing") for m in _attention_modules(pipe.transformer)
    }


def test_attention_backend_native_routes_every_attention(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    assert _backends(pipe) == {None}

    detail = AttentionBackend(AttentionBackend.Params(backend="native")).apply(
        pipe, apply_context("transformer")
    )

    assert isinstance(detail, str) and "native" in detail
    assert _backends(pipe) == {"native"}
    np.testing.assert_allclose(
        generate_array(pipe, PROMPT, STEPS), baseline("transformer", PROMPT, STEPS), atol=1e-5, rtol=0
    )


def test_attention_backend_list_falls_back_to_the_first_usable_one() -> None:
    pipe = tiny_pipeline("transformer")

    result = AttentionBackend(AttentionBackend.Params(backend=["flash", "native"])).apply(
        pipe, apply_context("transformer")
    )

    assert isinstance(result, StepResult)
    assert result.status == "fell back"
    assert result.detail is not None and "native" in result.detail and "flash" in result.detail
    assert "flash_attn" in result.detail or "CUDA" in result.detail  # why flash was passed over
    assert _backends(pipe) == {"native"}


def test_attention_backend_with_no_usable_backend_fails_and_changes_nothing() -> None:
    pipe = tiny_pipeline("transformer")
    with pytest.raises(RuntimeError, match="flash"):
        AttentionBackend(AttentionBackend.Params(backend="flash")).apply(pipe, apply_context("transformer"))
    assert _backends(pipe) == {None}


def test_attention_backend_unavailable_reason_on_cpu() -> None:
    reason = AttentionBackend.unavailable_reason(CPU, AttentionBackend.Params(backend="flash"))
    assert reason is not None and "flash" in reason
    assert "flash_attn" in reason or "CUDA" in reason
    assert (
        AttentionBackend.unavailable_reason(CPU, AttentionBackend.Params(backend=["flash", "native"])) is None
    )
    assert AttentionBackend.unavailable_reason(CPU, AttentionBackend.Params(backend="native")) is None


def test_attention_backend_checks_cuda_and_compute_capability() -> None:
    class EverythingInstalled(Environment):
        @staticmethod
        def has_package(import_name: str) -> bool:
            return True

    ampere = EverythingInstalled(device="cuda", device_kind="cuda", cuda_capability=(8, 0))
    hopper = EverythingInstalled(device="cuda", device_kind="cuda", cuda_capability=(9, 0))
    cpu = EverythingInstalled(device="cpu", device_kind="cpu")
    assert "9.0" in (backend_unavailable("flash_3", ampere) or "")
    assert backend_unavailable("flash_3", hopper) is None
    assert backend_unavailable("flash", ampere) is None
    assert "CUDA" in (backend_unavailable("sage", cpu) or "")


@pytest.mark.parametrize("backend", ["flashy", ["flash", "no_such_backend"], []])
def test_attention_backend_params_reject_unknown_names(backend: object) -> None:
    with pytest.raises(ValidationError):
        AttentionBackend.Params(backend=backend)


def test_attention_backend_names_exist_in_diffusers() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {member.value for member in AttentionBackendName}
    unknown = [name for name, needs in BACKENDS.items() if (needs.diffusers_name or name) not in known]
    assert unknown == []


# ---------------------------------------------------------------------------------------------- xformers
def test_xformers_says_everything_it_misses() -> None:
    on_cpu = Xformers.unavailable_reason(CPU)
    on_cuda = Xformers.unavailable_reason(Environment("cuda", "cuda", (9, 0)))
    package = "the package xformers (not installed)"
    if Environment.has_package("xformers"):
        assert on_cpu == "needs a CUDA device; this run uses cpu"
        assert on_cuda is None
    else:
        assert on_cpu == f"needs {package} and a CUDA device; this run uses cpu"
        assert on_cuda == f"needs {package}"


def test_xformers_with_skip_is_skipped_and_recorded(tmp_path: Path) -> None:
    record = run_recipe_data(
        tmp_path,
        {
            "optimize": [{"xformers": {"on_unavailable": "skip"}}],
            "prompts": [PROMPT],
            "generate": {"steps": 2},
        },
    )

    assert record["status"] == "complete"
    [entry] = record["plan"]
    assert entry["step"] == "xformers" and entry["status"] == "skipped"
    assert entry["detail"] == Xformers.unavailable_reason(CPU)
    assert len(record["images"]) == 1


def test_xformers_conflicts_with_attention_backend(tmp_path: Path) -> None:
    problem = plan_problem(tmp_path, "  - attention_backend: {backend: native}\n  - xformers\n", CPU)

    assert problem.location == "optimize[1]"
    assert "'xformers' conflicts with 'attention_backend'" in problem.message
