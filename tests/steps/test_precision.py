"""Weight storage steps (`dgrun.steps.precision`): layerwise_casting and channels_last.

Each test shows what the step changed in the weights (fp8 storage, NHWC layout) and that the images
(float arrays on a 0-1 scale from a fixed seed) stay within a stated tolerance of an untouched pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun.optimizer import Environment  # noqa: E402
from dgrun.steps.precision import ChannelsLast, LayerwiseCasting  # noqa: E402
from dgrun.testing import apply_context, diffusers_hooks, generate_array, plan_steps, tiny_pipeline  # noqa: E402

CPU = Environment(device="cpu", device_kind="cpu")
PROMPT = "a red circle on a blue background"
STEPS = 2
CASTING_HOOK = "layerwise_casting"  # diffusers/hooks/layerwise_casting.py _LAYERWISE_CASTING_HOOK
# fp8 weights on random-weight models: measured max 0.048 (UNet) / 0.0095 (Flux), mean well below 0.01.
FP8_MAX, FP8_MEAN = 0.1, 0.02


# ------------------------------------------------------------------------------------ layerwise_casting
@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_layerwise_casting_stores_weights_in_fp8(kind: str, baseline) -> None:
    pipe = tiny_pipeline(kind)
    denoiser = pipe.unet if kind == "unet" else pipe.transformer
    detail = LayerwiseCasting(LayerwiseCasting.Params()).apply(pipe, apply_context(kind))

    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    fp8 = [m for m in linears if m.weight.dtype == torch.float8_e4m3fn]
    assert len(fp8) >= 0.8 * len(linears)  # diffusers keeps norms, embeddings, proj_in/out in fp32
    assert CASTING_HOOK in diffusers_hooks(fp8[0])[""]
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float32  # only the denoiser by default
    assert "float8_e4m3fn storage, float32 compute" in detail

    difference = np.abs(generate_array(pipe, PROMPT, STEPS) - baseline(kind, PROMPT, STEPS))
    assert difference.max() <= FP8_MAX and difference.mean() <= FP8_MEAN


def test_layerwise_casting_e5m2_on_a_named_component_and_the_compute_dtype_check() -> None:
    pipe = tiny_pipeline("transformer")
    LayerwiseCasting(LayerwiseCasting.Params(storage_dtype="float8_e5m2", components=["vae"])).apply(
        pipe, apply_context("transformer")
    )
    assert any(p.dtype == torch.float8_e5m2 for p in pipe.vae.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())

    # Activations arrive in float32: a bfloat16 compute dtype would fail inside the first layer.
    mismatched = LayerwiseCasting(LayerwiseCasting.Params(compute_dtype="bfloat16"))
    with pytest.raises(RuntimeError, match="compute_dtype bfloat16 differs from the dtype of transformer"):
        mismatched.apply(tiny_pipeline("transformer"), apply_context("transformer"))


# ---------------------------------------------------------------------------------------- channels_last
def test_channels_last_lays_out_conv_weights_nhwc(baseline) -> None:
    pipe = tiny_pipeline("unet")
    detail = ChannelsLast(ChannelsLast.Params()).apply(pipe, apply_context("unet"))

    for component in (pipe.unet, pipe.vae):  # default: denoiser + VAE
        convs = [p for p in component.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)
    assert "unet (" in detail and "vae (" in detail
    np.testing.assert_allclose(
        generate_array(pipe, PROMPT, STEPS), baseline("unet", PROMPT, STEPS), atol=1e-5
    )


def test_channels_last_has_no_order_rule_with_compile(tmp_path: Path) -> None:
    # compile traces at the first pipeline call, after every step: the layout it sees is the same.
    plan = plan_steps(tmp_path, "  - compile\n  - channels_last\n", CPU)
    assert [s.name for s in plan.steps] == ["compile", "channels_last"]
