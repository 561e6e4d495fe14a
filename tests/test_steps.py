"""Built-in steps (tf32, vae_*, fuse_qkv, attention_backend, first_block_cache, compile) on tiny pipelines.

Each test shows what the step changed in the pipeline, not merely that it ran.

Images are float arrays on a 0–1 scale from a fixed seed. Steps mutate the pipeline they are given, so every
test builds fresh pipelines; only the untouched baseline images are cached for the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.optimizer import ApplyContext, Environment, ModelKind, StepResult  # noqa: E402
from dgrun.steps.attention import BACKENDS, AttentionBackend, FuseQkv, backend_unavailable  # noqa: E402
from dgrun.steps.cache import FirstBlockCache  # noqa: E402
from dgrun.steps.compile import Compile  # noqa: E402
from dgrun.steps.runtime import TF32  # noqa: E402
from dgrun.steps.vae import VaeSlicing, VaeTiling  # noqa: E402
from dgrun.testing import count_calls, generate_array, tiny_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
PROMPTS = [PROMPT, "a green square on a white background"]
KINDS = {"unet": ModelKind.UNET, "transformer": ModelKind.TRANSFORMER}

# diffusers' hook names (diffusers/hooks/first_block_cache.py) for the head block and the blocks after it.
FBC_HEAD_HOOK = "fbc_leader_block_hook"
FBC_BLOCK_HOOK = "fbc_block_hook"


# ---------------------------------------------------------------------------------------------- helpers
def _ctx(
    kind: str | None = None, width: int | None = 32, height: int | None = 32, env: Environment | None = None
) -> ApplyContext:
    return ApplyContext(
        env=env or Environment(device="cpu", device_kind="cpu"),
        model_kind=KINDS.get(kind) if kind else None,
        dtype=torch.float32,
        width=width,
        height=height,
    )


def _generate(pipe, prompt: str | list[str] = PROMPT, steps: int = 4) -> np.ndarray:
    return generate_array(pipe, prompt, steps)


def _counting(module: torch.nn.Module) -> Iterator[list[int]]:
    return count_calls(module)


def _attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "processor") and hasattr(m, "to_q")]


def _compiled(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._compiled_call_impl is not None]


@pytest.fixture(scope="module")
def baseline() -> Callable[..., np.ndarray]:
    """Images of an untouched pipeline, computed once per (kind, prompt, steps)."""
    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def get(kind: str, prompt: str | list[str] = PROMPT, steps: int = 4) -> np.ndarray:
        key = (kind, repr(prompt), steps)
        if key not in cache:
            cache[key] = _generate(tiny_pipeline(kind), prompt, steps)
        return cache[key]

    return get


@pytest.fixture
def restore_tf32() -> Iterator[None]:
    """TF32 steps change process-wide torch flags; put them back after the test."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


# ------------------------------------------------------------------------------------------------- tf32
def test_tf32_is_a_recorded_noop_on_cpu(restore_tf32: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    detail = TF32(TF32.Params()).apply(None, _ctx())

    assert isinstance(detail, str) and "no-op" in detail and "cpu" in detail
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_on_cuda_sets_the_process_flags_both_ways(restore_tf32: None) -> None:
    # Only process-wide flags are touched, and CPU builds of torch have them too.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    turing = Environment(device="cuda", device_kind="cuda", cuda_capability=(7, 5))

    detail = TF32(TF32.Params()).apply(None, _ctx(env=turing))

    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert detail is not None and "7.5" in detail and "no TF32" in detail

    hopper = Environment(device="cuda", device_kind="cuda", cuda_capability=(9, 0))
    assert TF32(TF32.Params(enabled=False)).apply(None, _ctx(env=hopper)) is None
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


# ------------------------------------------------------------------------------------------ vae_slicing
def test_vae_slicing_decodes_a_batch_one_image_at_a_time(baseline) -> None:
    pipe = tiny_pipeline("unet")
    assert pipe.vae.use_slicing is False

    assert VaeSlicing(VaeSlicing.Params()).apply(pipe, _ctx("unet")) is None
    assert pipe.vae.use_slicing is True

    with _counting(pipe.vae.decoder) as decoder_calls:
        images = _generate(pipe, PROMPTS)
    assert decoder_calls[0] == 2  # unsliced: one decoder call for the whole batch
    expected = baseline("unet", PROMPTS)
    assert images.shape == expected.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


def test_vae_slicing_needs_a_vae() -> None:
    class NoVae:
        vae = None

    with pytest.raises(RuntimeError, match="no `vae`"):
        VaeSlicing(VaeSlicing.Params()).apply(NoVae(), _ctx())


# ------------------------------------------------------------------------------------------- vae_tiling
@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_vae_tiling_decodes_tile_by_tile(kind: str, baseline) -> None:
    pipe = tiny_pipeline(kind)
    assert pipe.vae.use_tiling is False

    assert VaeTiling(VaeTiling.Params()).apply(pipe, _ctx(kind)) is None
    assert pipe.vae.use_tiling is True

    with _counting(pipe.vae.decoder) as decoder_calls:
        image = _generate(pipe)
    # 16 px tiles with overlap on a 32 px image: several decoder calls for one image instead of one.
    assert decoder_calls[0] > 1
    diff = np.abs(image - baseline(kind))
    assert diff.max() > 1e-3, "tiling did not change the decode at all"
    assert diff.max() < 0.5 and diff.mean() < 0.1, "tiled decode is not the same picture any more"
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_vae_tiling_auto_above_leaves_small_images_untiled(baseline) -> None:
    pipe = tiny_pipeline("unet")

    detail = VaeTiling(VaeTiling.Params(auto_above=1536)).apply(pipe, _ctx("unet", 32, 32))

    assert detail is not None and "not enabled" in detail and "1536" in detail
    assert pipe.vae.use_tiling is False
    with _counting(pipe.vae.decoder) as decoder_calls:
        image = _generate(pipe)
    assert decoder_calls[0] == 1
    np.testing.assert_allclose(image, baseline("unet"), atol=1e-6, rtol=0)


def test_vae_tiling_auto_above_tiles_larger_images() -> None:
    pipe = tiny_pipeline("unet")
    assert VaeTiling(VaeTiling.Params(auto_above=32)).apply(pipe, _ctx("unet", 32, 32)) is not None
    assert pipe.vae.use_tiling is False  # 32 is not above 32

    assert VaeTiling(VaeTiling.Params(auto_above=32)).apply(pipe, _ctx("unet", 64, 32)) is None
    assert pipe.vae.use_tiling is True


def test_vae_tiling_params_reject_a_tiny_threshold() -> None:
    with pytest.raises(ValidationError):
        VaeTiling.Params(auto_above=4)


# --------------------------------------------------------------------------------------------- fuse_qkv
def test_fuse_qkv_fuses_the_transformer_attention(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    attentions = _attention_modules(pipe.transformer)
    assert len(attentions) == 4
    assert not any(getattr(a, "fused_projections", False) or hasattr(a, "to_qkv") for a in attentions)

    detail = FuseQkv(FuseQkv.Params()).apply(pipe, _ctx("transformer"))

    assert detail == "fused in transformer"
    assert all(a.fused_projections and isinstance(a.to_qkv, torch.nn.Linear) for a in attentions)
    # The double-stream blocks also fuse the text stream's projections.
    assert all(hasattr(block.attn, "to_added_qkv") for block in pipe.transformer.transformer_blocks)
    first = attentions[0]
    with _counting(first.to_qkv) as fused_calls, _counting(first.to_q) as unfused_calls:
        image = _generate(pipe)
    assert fused_calls[0] == 4 and unfused_calls[0] == 0  # the fused matmul replaced the separate ones
    np.testing.assert_allclose(image, baseline("transformer"), atol=1e-4, rtol=0)


def test_fuse_qkv_fuses_the_unet_attention(baseline) -> None:
    pipe = tiny_pipeline("unet")
    assert hasattr(pipe.unet, "fuse_qkv_projections")
    processors_before = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert "FusedAttnProcessor2_0" not in processors_before

    assert FuseQkv(FuseQkv.Params()).apply(pipe, _ctx("unet")) == "fused in unet"

    attentions = _attention_modules(pipe.unet)
    self_attention = [a for a in attentions if not a.is_cross_attention]
    cross_attention = [a for a in attentions if a.is_cross_attention]
    assert self_attention and cross_attention
    assert all(a.fused_projections for a in attentions)
    assert all(isinstance(a.to_qkv, torch.nn.Linear) for a in self_attention)
    assert all(isinstance(a.to_kv, torch.nn.Linear) for a in cross_attention)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    with _counting(self_attention[0].to_qkv) as fused_calls:
        image = _generate(pipe)
    assert fused_calls[0] == 4  # CFG runs both halves in one batch: one call per step
    np.testing.assert_allclose(image, baseline("unet"), atol=1e-4, rtol=0)


def test_fuse_qkv_names_components_it_cannot_fuse() -> None:
    pipe = tiny_pipeline("unet")
    with pytest.raises(RuntimeError, match=r"text_encoder.*cannot fuse"):
        FuseQkv(FuseQkv.Params(components=["text_encoder"])).apply(pipe, _ctx("unet"))
    with pytest.raises(RuntimeError, match="no component 'transformer'"):
        FuseQkv(FuseQkv.Params(components=["transformer"])).apply(pipe, _ctx("unet"))


# ------------------------------------------------------------------------------------ attention_backend
def _backends(pipe) -> set[object]:
    return {
        getattr(m.processor, "_attention_backend", "missing") for m in _attention_modules(pipe.transformer)
    }


def test_attention_backend_native_routes_every_attention(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    assert _backends(pipe) == {None}

    detail = AttentionBackend(AttentionBackend.Params(backend="native")).apply(pipe, _ctx("transformer"))

    assert isinstance(detail, str) and "native" in detail
    assert _backends(pipe) == {"native"}
    np.testing.assert_allclose(_generate(pipe), baseline("transformer"), atol=1e-5, rtol=0)


def test_attention_backend_list_falls_back_to_the_first_usable_one() -> None:
    pipe = tiny_pipeline("transformer")

    result = AttentionBackend(AttentionBackend.Params(backend=["flash", "native"])).apply(
        pipe, _ctx("transformer")
    )

    assert isinstance(result, StepResult)
    assert result.status == "fell back"
    assert result.detail is not None and "native" in result.detail and "flash" in result.detail
    assert "flash_attn" in result.detail or "CUDA" in result.detail  # why flash was passed over
    assert _backends(pipe) == {"native"}


def test_attention_backend_with_no_usable_backend_fails_and_changes_nothing() -> None:
    pipe = tiny_pipeline("transformer")
    with pytest.raises(RuntimeError, match="flash"):
        AttentionBackend(AttentionBackend.Params(backend="flash")).apply(pipe, _ctx("transformer"))
    assert _backends(pipe) == {None}


def test_attention_backend_unavailable_reason_on_cpu() -> None:
    cpu = Environment(device="cpu", device_kind="cpu")
    reason = AttentionBackend.unavailable_reason(cpu, AttentionBackend.Params(backend="flash"))
    assert reason is not None and "flash" in reason
    assert "flash_attn" in reason or "CUDA" in reason
    assert (
        AttentionBackend.unavailable_reason(cpu, AttentionBackend.Params(backend=["flash", "native"])) is None
    )
    assert AttentionBackend.unavailable_reason(cpu, AttentionBackend.Params(backend="native")) is None


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


# ------------------------------------------------------------------------------------ first_block_cache
def _fbc_hooks(pipe) -> tuple[object, object]:
    head = pipe.transformer.transformer_blocks[0]
    tail = pipe.transformer.single_transformer_blocks[-1]
    head_registry = getattr(head, "_diffusers_hook", None)
    tail_registry = getattr(tail, "_diffusers_hook", None)
    return (
        head_registry and head_registry.get_hook(FBC_HEAD_HOOK),
        tail_registry and tail_registry.get_hook(FBC_BLOCK_HOOK),
    )


def test_first_block_cache_skips_the_later_blocks(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    assert _fbc_hooks(pipe) == (None, None)

    FirstBlockCache(FirstBlockCache.Params(threshold=0.5)).apply(pipe, _ctx("transformer"))

    assert all(hook is not None for hook in _fbc_hooks(pipe))
    # A module inside the last block: it only runs when the block is computed, not served from the cache.
    # (A hook on the block itself would fire either way: diffusers replaces the block's `forward`.)
    inner = pipe.transformer.single_transformer_blocks[-1].attn
    with _counting(inner) as calls:
        image = _generate(pipe, steps=8)
    assert 1 <= calls[0] <= 2, f"the last block ran {calls[0]} of 8 steps"
    diff = np.abs(image - baseline("transformer", steps=8))
    assert diff.max() > 0, "reusing the cached residuals did not change the image at all"
    assert diff.mean() < 0.05

    # The cache state is per call: the runner's warm-up call does not leak into the next one.
    with _counting(inner) as calls_again:
        again = _generate(pipe, steps=8)
    assert calls_again[0] == calls[0]
    np.testing.assert_allclose(again, image, atol=1e-6, rtol=0)


def test_first_block_cache_recomputes_when_the_first_block_changes_a_lot(baseline) -> None:
    pipe = tiny_pipeline("transformer")

    FirstBlockCache(FirstBlockCache.Params(threshold=0.2)).apply(pipe, _ctx("transformer"))

    assert all(hook is not None for hook in _fbc_hooks(pipe))
    with _counting(pipe.transformer.single_transformer_blocks[-1].attn) as calls:
        image = _generate(pipe)
    # Random weights change the first block's output by more than 20 % per step: nothing is skipped.
    assert calls[0] == 4
    np.testing.assert_allclose(image, baseline("transformer"), atol=1e-5, rtol=0)


def test_first_block_cache_after_fuse_qkv_still_skips() -> None:
    pipe = tiny_pipeline("transformer")
    FuseQkv(FuseQkv.Params()).apply(pipe, _ctx("transformer"))
    FirstBlockCache(FirstBlockCache.Params(threshold=0.5)).apply(pipe, _ctx("transformer"))

    with _counting(pipe.transformer.single_transformer_blocks[-1].attn.to_qkv) as calls:
        _generate(pipe, steps=8)
    assert 1 <= calls[0] <= 2


def test_first_block_cache_threshold_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        FirstBlockCache.Params(threshold=0)


# ---------------------------------------------------------------------------------------------- compile
@pytest.fixture
def dynamo() -> Iterator[object]:
    """A clean dynamo cache and counters (tests compile fresh module instances)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compile_compiles_the_denoiser_in_place_and_recovers(baseline, dynamo) -> None:
    pipe = tiny_pipeline("transformer")
    transformer = pipe.transformer
    assert _compiled(transformer) == []
    step = Compile(Compile.Params(backend="aot_eager"))

    detail = step.apply(pipe, _ctx("transformer"))

    assert detail == "transformer with aot_eager"
    assert pipe.transformer is transformer  # compiled in place: same component, same state dict keys
    assert pipe.components["transformer"] is transformer
    assert _compiled(transformer) == [""]
    image = _generate(pipe, steps=1)
    assert dynamo["stats"]["unique_graphs"] >= 1, "the first call did not go through torch.compile"
    np.testing.assert_allclose(image, baseline("transformer", steps=1), atol=1e-4, rtol=0)

    message = step.recover(pipe, RuntimeError("backend exploded\nlong traceback"))

    assert message is not None and message.startswith("fell back to eager")
    assert "RuntimeError: backend exploded" in message and "long traceback" not in message
    assert _compiled(transformer) == []
    assert step.recover(pipe, RuntimeError("again")) is None  # nothing left to undo


def test_compile_regional_compiles_only_the_repeated_blocks(baseline, dynamo) -> None:
    pipe = tiny_pipeline("transformer")
    transformer = pipe.transformer
    step = Compile(Compile.Params(backend="aot_eager", regional=True))

    detail = step.apply(pipe, _ctx("transformer"))

    assert detail == "transformer (4 regions) with aot_eager"
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert sorted(_compiled(transformer)) == sorted(
        [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    )
    image = _generate(pipe, steps=1)
    assert dynamo["stats"]["unique_graphs"] >= 1
    np.testing.assert_allclose(image, baseline("transformer", steps=1), atol=1e-4, rtol=0)

    assert (step.recover(pipe, RuntimeError("boom")) or "").startswith("fell back to eager")
    assert _compiled(transformer) == []


def test_compile_unet_regional_and_vae_decode_are_undone_by_recover() -> None:
    # No pipeline call here: compilation itself would happen at the first call.
    pipe = tiny_pipeline("unet")
    step = Compile(Compile.Params(backend="aot_eager", regional=True, vae_decode=True))

    detail = step.apply(pipe, _ctx("unet"))

    assert detail is not None and "unet (4 regions)" in detail and "vae.decode" in detail
    compiled = _compiled(pipe.unet)
    assert len(compiled) == 4 and all(name.endswith("transformer_blocks.0") for name in compiled)
    assert "decode" in vars(pipe.vae)  # the compiled wrapper shadows the method on the instance

    assert (step.recover(pipe, RuntimeError("boom")) or "").startswith("fell back to eager")
    assert _compiled(pipe.unet) == []
    assert "decode" not in vars(pipe.vae)
    assert pipe.vae.decode.__func__ is type(pipe.vae).decode


def test_compile_whole_unet_in_place() -> None:
    pipe = tiny_pipeline("unet")
    unet = pipe.unet
    assert Compile(Compile.Params(backend="aot_eager")).apply(pipe, _ctx("unet")) == "unet with aot_eager"
    assert pipe.unet is unet and _compiled(unet) == [""]


def test_compile_regional_needs_repeated_blocks() -> None:
    pipe = tiny_pipeline("unet")
    with pytest.raises(RuntimeError, match="no repeated blocks"):
        Compile(Compile.Params(regional=True, components=["vae"])).apply(pipe, _ctx("unet"))
    assert _compiled(pipe.vae) == []


def test_compile_recover_without_compiling_does_nothing() -> None:
    assert Compile(Compile.Params()).recover(tiny_pipeline("unet"), RuntimeError("x")) is None


def test_compile_params_are_checked() -> None:
    with pytest.raises(ValidationError):
        Compile.Params(mode="fastest")
    with pytest.raises(ValidationError):
        Compile.Params(backend="")
