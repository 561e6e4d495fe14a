"""The compile step (`dgrun.steps.compile`, `dgrun.steps.inductor_flags`): whole and regional compilation in
place, recovery to eager when a backend fails, params and the inductor flags a recipe may set.

Compiling tests use the `aot_eager` backend (no C++ compiler needed) and compare the images (float arrays
on a 0-1 scale from a fixed seed) with an untouched pipeline's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.steps.compile import Compile, CompileParams  # noqa: E402
from dgrun.testing import apply_context, generate_array, tiny_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture
def dynamo() -> Iterator[object]:
    """A clean dynamo cache and counters (tests compile fresh module instances)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _compiled(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._compiled_call_impl is not None]


def _compile_error(message: str) -> BaseException:
    """What torch.compile raises when a backend fails: dynamo's error, the backend's as its cause."""
    from torch._dynamo.exc import InternalTorchDynamoError

    error = InternalTorchDynamoError(message)
    error.__cause__ = RuntimeError(message)
    return error


def test_compile_compiles_the_denoiser_in_place_and_recovers(baseline, dynamo) -> None:
    pipe = tiny_pipeline("transformer")
    transformer = pipe.transformer
    assert _compiled(transformer) == []
    step = Compile(Compile.Params(backend="aot_eager"))

    detail = step.apply(pipe, apply_context("transformer"))

    assert detail == "transformer with aot_eager"
    assert pipe.transformer is transformer  # compiled in place: same component, same state dict keys
    assert pipe.components["transformer"] is transformer
    assert _compiled(transformer) == [""]
    image = generate_array(pipe, PROMPT, 1)
    assert dynamo["stats"]["unique_graphs"] >= 1, "the first call did not go through torch.compile"
    np.testing.assert_allclose(image, baseline("transformer", PROMPT, 1), atol=1e-4, rtol=0)

    # An error from the compiled model's own code (say, an attention kernel) is not compile's to undo.
    assert step.recover(pipe, RuntimeError("kernel failed")) is None
    assert _compiled(transformer) == [""]
    message = step.recover(pipe, _compile_error("backend exploded\nlong traceback"))

    assert message is not None and message.startswith("fell back to eager")
    assert "backend exploded" in message and "long traceback" not in message
    assert _compiled(transformer) == []
    assert step.recover(pipe, _compile_error("again")) is None  # nothing left to undo


def test_compile_regional_compiles_only_the_repeated_blocks(baseline, dynamo) -> None:
    pipe = tiny_pipeline("transformer")
    transformer = pipe.transformer
    step = Compile(Compile.Params(backend="aot_eager", regional=True))

    detail = step.apply(pipe, apply_context("transformer"))

    assert detail == "transformer (4 regions) with aot_eager"
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert sorted(_compiled(transformer)) == sorted(
        [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    )
    image = generate_array(pipe, PROMPT, 1)
    assert dynamo["stats"]["unique_graphs"] >= 1
    np.testing.assert_allclose(image, baseline("transformer", PROMPT, 1), atol=1e-4, rtol=0)

    assert (step.recover(pipe, _compile_error("boom")) or "").startswith("fell back to eager")
    assert _compiled(transformer) == []


def test_compile_unet_regional_and_vae_decode_are_undone_by_recover() -> None:
    # No pipeline call here: compilation itself would happen at the first call.
    pipe = tiny_pipeline("unet")
    step = Compile(Compile.Params(backend="aot_eager", regional=True, vae_decode=True))

    detail = step.apply(pipe, apply_context("unet"))

    assert detail is not None and "unet (4 regions)" in detail and "vae.decode" in detail
    compiled = _compiled(pipe.unet)
    assert len(compiled) == 4 and all(name.endswith("transformer_blocks.0") for name in compiled)
    assert "decode" in vars(pipe.vae)  # the compiled wrapper shadows the method on the instance

    assert (step.recover(pipe, _compile_error("boom")) or "").startswith("fell back to eager")
    assert _compiled(pipe.unet) == []
    assert "decode" not in vars(pipe.vae)
    assert pipe.vae.decode.__func__ is type(pipe.vae).decode


def test_compile_whole_unet_in_place() -> None:
    pipe = tiny_pipeline("unet")
    unet = pipe.unet
    assert (
        Compile(Compile.Params(backend="aot_eager")).apply(pipe, apply_context("unet"))
        == "unet with aot_eager"
    )
    assert pipe.unet is unet and _compiled(unet) == [""]


def test_compile_regional_needs_repeated_blocks() -> None:
    pipe = tiny_pipeline("unet")
    with pytest.raises(RuntimeError, match="no repeated blocks"):
        Compile(Compile.Params(regional=True, components=["vae"])).apply(pipe, apply_context("unet"))
    assert _compiled(pipe.vae) == []


def test_compile_recover_without_compiling_does_nothing() -> None:
    assert Compile(Compile.Params()).recover(tiny_pipeline("unet"), RuntimeError("x")) is None


def test_compile_params_are_checked() -> None:
    with pytest.raises(ValidationError):
        Compile.Params(mode="fastest")
    with pytest.raises(ValidationError):
        Compile.Params(backend="")


# ------------------------------------------------------------------------------------- inductor flags
def test_compile_passes_inductor_flags_for_this_compile_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    pipe = tiny_pipeline("transformer")
    flags = {"epilogue_fusion": False, "coordinate_descent_search_radius": 2}
    params = CompileParams.model_validate({"mode": "max-autotune-no-cudagraphs", "inductor": flags})

    detail = Compile(params).apply(pipe, apply_context("transformer"))

    [kwargs] = seen
    # torch.compile takes `mode` or `options`: the mode is spelled out as its inductor options.
    assert "mode" not in kwargs
    assert kwargs["options"] == {"max_autotune": True, "coordinate_descent_tuning": True, **flags}
    assert inductor_config.epilogue_fusion is True  # nothing process-wide changed
    assert "max-autotune-no-cudagraphs + " in detail
    assert "epilogue_fusion=False" in detail and "coordinate_descent_search_radius=2" in detail


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"epilogue_fuson": False}, "epilogue_fuson"),
        ({"epilogue_fusion": 1}, "Input should be a valid boolean"),
        ({"coordinate_descent_search_radius": True}, "Input should be a valid integer"),
        ({"cpp.cxx": "/tmp/evil.sh"}, "cpp.cxx"),
        ({"trace.debug_dir": "/tmp"}, "trace.debug_dir"),
        ({"triton.max_tiles": 9}, "less than or equal to 3"),
    ],
)
def test_compile_rejects_bad_or_unsafe_inductor_flags_when_validated(
    flags: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        CompileParams.model_validate({"inductor": flags})


def test_inductor_flags_need_the_inductor_backend() -> None:
    with pytest.raises(ValidationError, match="inductor flags need backend: inductor"):
        CompileParams(backend="aot_eager", inductor={"epilogue_fusion": False})
