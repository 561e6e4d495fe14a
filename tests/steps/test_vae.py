"""VAE decode steps (`dgrun.steps.vae`): vae_slicing and vae_tiling on the tiny pipelines.

Each test counts the VAE decoder's calls to show the step changed how images are decoded, and compares
the images (float arrays on a 0-1 scale from a fixed seed) with an untouched pipeline's.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dgrun.steps.vae import VaeSlicing, VaeTiling  # noqa: E402
from dgrun.testing import apply_context, count_calls, generate_array, tiny_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
PROMPTS = [PROMPT, "a green square on a white background"]
STEPS = 4


# ------------------------------------------------------------------------------------------ vae_slicing
def test_vae_slicing_decodes_a_batch_one_image_at_a_time(baseline) -> None:
    pipe = tiny_pipeline("unet")
    assert pipe.vae.use_slicing is False

    assert VaeSlicing(VaeSlicing.Params()).apply(pipe, apply_context("unet")) is None
    assert pipe.vae.use_slicing is True

    with count_calls(pipe.vae.decoder) as decoder_calls:
        images = generate_array(pipe, PROMPTS, STEPS)
    assert decoder_calls[0] == 2  # unsliced: one decoder call for the whole batch
    expected = baseline("unet", PROMPTS, STEPS)
    assert images.shape == expected.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


def test_vae_slicing_needs_a_vae() -> None:
    class NoVae:
        vae = None

    with pytest.raises(RuntimeError, match="no `vae`"):
        VaeSlicing(VaeSlicing.Params()).apply(NoVae(), apply_context())


# ------------------------------------------------------------------------------------------- vae_tiling
@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_vae_tiling_decodes_tile_by_tile(kind: str, baseline) -> None:
    pipe = tiny_pipeline(kind)
    assert pipe.vae.use_tiling is False

    assert VaeTiling(VaeTiling.Params()).apply(pipe, apply_context(kind)) == "tiles of 16 px"
    assert pipe.vae.use_tiling is True

    with count_calls(pipe.vae.decoder) as decoder_calls:
        image = generate_array(pipe, PROMPT, STEPS)
    # 16 px tiles with overlap on a 32 px image: several decoder calls for one image instead of one.
    assert decoder_calls[0] > 1
    diff = np.abs(image - baseline(kind, PROMPT, STEPS))
    assert diff.max() > 1e-3, "tiling did not change the decode at all"
    assert diff.max() < 0.5 and diff.mean() < 0.1, "tiled decode is not the same picture any more"
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_vae_tiling_auto_above_leaves_small_images_untiled(baseline) -> None:
    pipe = tiny_pipeline("unet")

    detail = VaeTiling(VaeTiling.Params(auto_above=1536)).apply(
        pipe, apply_context("unet", width=32, height=32)
    )

    assert detail is not None and "not enabled" in detail and "1536" in detail
    assert pipe.vae.use_tiling is False
    with count_calls(pipe.vae.decoder) as decoder_calls:
        image = generate_array(pipe, PROMPT, STEPS)
    assert decoder_calls[0] == 1
    np.testing.assert_allclose(image, baseline("unet", PROMPT, STEPS), atol=1e-6, rtol=0)


def test_vae_tiling_auto_above_tiles_larger_images() -> None:
    pipe = tiny_pipeline("unet")
    small = apply_context("unet", width=32, height=32)
    assert VaeTiling(VaeTiling.Params(auto_above=32)).apply(pipe, small) is not None
    assert pipe.vae.use_tiling is False  # 32 is not above 32

    wide = apply_context("unet", width=64, height=32)
    assert VaeTiling(VaeTiling.Params(auto_above=32)).apply(pipe, wide) == "tiles of 16 px"
    assert pipe.vae.use_tiling is True


def test_vae_tiling_params_reject_a_tiny_threshold() -> None:
    with pytest.raises(ValidationError):
        VaeTiling.Params(auto_above=4)
