"""Components of `dgrun:default` (UNet) and `dgrun:default-dit` (SD3 transformer), and their loaders.

Sizes follow a feasibility run on 2 CPU cores (see the project notes): every part is small enough to train
from scratch in minutes, yet the pipelines are ordinary diffusers classes, saved with `save_pretrained`, so
every optimization step treats them like any checkpoint from a model hub.

Images are 64×64; the VAE downsamples by 4, so the denoisers work on 16×16×4 latents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgrun.models.shapes import PROMPT_WORDS

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_LENGTH = 16  # "a {c} {shape} on a {c} background" is 9 tokens with BOS/EOS; room for a few more
TEXT_HIDDEN = 64
# DDPM training schedule of the UNet; the shipped DDIM scheduler must use the same betas.
BETA_START, BETA_END, TRAIN_TIMESTEPS = 1e-4, 0.02, 1000
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer_files(directory: Path, words: tuple[str, ...] = PROMPT_WORDS) -> None:
    """vocab.json + merges.txt: the byte alphabet (so any prompt tokenizes) plus one token per prompt word.

    Each word is built by merging its characters left to right, ending with the word-final symbol (`e</w>`),
    never a bare `</w>`, which the CLIP tokenizer cannot read back.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        if len(word) < 2:
            continue
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            if left not in tokens:
                tokens.append(left)
    tokens += [_BOS, _EOS]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=TEXT_LENGTH
    )


def _text_config(tokenizer: CLIPTokenizer, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=projection_dim,
        # The pooled output is read at the first EOS id, so these ids must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> torch.nn.Module:
    """CLIPTextModel for the UNet pipeline: cross-attention reads its last hidden state (width 64)."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN))


def build_projected_text_encoder(tokenizer: CLIPTokenizer) -> torch.nn.Module:
    """CLIPTextModelWithProjection for SD3: two of them give 2×64 token width and 2×32 pooled width."""
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(_text_config(tokenizer, TEXT_HIDDEN // 2))


def build_vae() -> AutoencoderKL:
    """Three-level AutoencoderKL (64×64×3 → 16×16×4); narrow at full resolution, where convolutions cost most.

    No attention in the mid block: flat-coloured shapes need none, and it would dominate the cost.
    `sample_size` (the tiling tile) is half the image, so `enable_tiling()` really tiles at the native size.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE // 2,
        mid_block_add_attention=False,
    )


def build_unet() -> torch.nn.Module:
    """UNet2DConditionModel on 16×16 latents; no attention at full latent resolution (it halves the cost)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_transformer() -> torch.nn.Module:
    """SD3Transformer2DModel: 2×2 patches of the 16×16 latent (64 image tokens), 4 joint blocks, width 128."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=128,
        pooled_projection_dim=TEXT_HIDDEN,
        pos_embed_max_size=32,
    )


def ddim_scheduler() -> Any:
    """DDIM with trailing spacing: 20 steps start at the last training timestep (pure noise)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused with trailing spacing; 0 only draws a deprecation warning
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=1.0)


def assemble_sd(
    vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any | None = None
) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assemble_sd3(
    vae: Any, text_encoder: Any, text_encoder_2: Any, tokenizer: Any, transformer: Any
) -> StableDiffusion3Pipeline:
    """SD3 without the T5 encoder: its slot stays empty and the pipeline feeds zeros in its place."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _load(name: str, extra: dict[str, Any], dtype: torch.dtype | None, directory: Path | None) -> Any:
    from diffusers import DiffusionPipeline

    path = directory or WEIGHTS_DIR / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no weights for dgrun:{name} in {path}; rebuild them with `python -m dgrun.models.train`"
        )
    # The weights are stored in float16 to keep the repository small; float32 is what a CPU runs fastest.
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype or _float32(), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _float32() -> Any:
    import torch

    return torch.float32


def load_default(dtype: torch.dtype | None = None, directory: Path | None = None) -> StableDiffusionPipeline:
    """`dgrun:default`: the shipped StableDiffusionPipeline, 64×64 px."""
    return _load("default", {}, dtype, directory)


def load_default_dit(
    dtype: torch.dtype | None = None, directory: Path | None = None
) -> StableDiffusion3Pipeline:
    """`dgrun:default-dit`: the shipped StableDiffusion3Pipeline (no T5), 64×64 px."""
    return _load("default-dit", {"text_encoder_3": None, "tokenizer_3": None}, dtype, directory)
