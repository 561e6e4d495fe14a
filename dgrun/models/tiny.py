"""Tiny random-weight diffusers pipelines, built offline, for fast and deterministic tests.

Both pipelines keep the real component classes (UNet / Flux transformer, AutoencoderKL, CLIP, T5, the real
schedulers) so that optimization steps exercise the same code paths as full-size checkpoints, while every
component is small enough that a 2–4 step call takes well under a second on CPU. Nothing is downloaded:
tokenizers are assembled from a synthetic vocabulary and every weight comes from a fixed seed.

Native output size is 32×32 px for both pipelines (VAE scale factor 2, 16×16 latents).
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

T = TypeVar("T")

_SEED = 0
_HIDDEN = 32  # width shared by both text encoders, so cross-attention and pooled projections line up
_CLIP_MAX_LENGTH = 77
# FluxPipeline's default max_sequence_length; T5's relative position buckets cope with any length.
_T5_MAX_LENGTH = 512
_LATENT_CHANNELS = 4
_LATENT_SIZE = 16  # 16×16 latents × VAE scale factor 2 → 32×32 px
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _seeded(offset: int, build: Callable[[], T]) -> T:
    """Build one component from its own seed, so weights neither depend on nor disturb the global RNG.

    A per-component seed also keeps each component's weights stable when another component's config changes.
    """
    import torch

    # Components are built on CPU, so only the CPU generator is forked and seeded; torch.manual_seed would
    # also reseed (and, unforked, disturb) the caller's CUDA generators.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_SEED + offset)
        return build()


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP byte-level BPE tokenizer over the 256 byte symbols (plain and word-final), with a few merges.

    Written to files and loaded by path: unlike in-memory vocab/merges, that form also suits transformers 4.x.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [_BOS, _EOS]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=_CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5TokenizerFast:
    """SentencePiece-style (Unigram + Metaspace) tokenizer over printable ASCII, laid out like T5's vocab.

    Ids follow T5's convention (<pad>=0, </s>=1, <unk>=2) and every sequence ends with </s>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=_T5_MAX_LENGTH,
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=_HIDDEN,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        # The pooled output is read at the first EOS id, so the ids must match the tokenizer.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _t5_text_encoder(tokenizer: T5TokenizerFast) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # as in the T5 v1.1 / XXL encoder Flux uses
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(**config: object) -> torch.nn.Module:
    """Two-level AutoencoderKL: scale factor 2 keeps latents (and thus the denoiser) tiny.

    `sample_size` only sets the tile size, so 16 px (half the native image) makes `enable_tiling()` really
    tile at the native size instead of silently doing nothing.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=_LATENT_SIZE,
        **config,
    ).eval()


def _finish(pipe: T, dtype: torch.dtype | None) -> T:
    """Silence progress bars (these pipelines run many times per test session) and cast as asked."""
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype is not None else pipe


def build_tiny_sd(dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with the SD 1.x layout in miniature; `pipe(prompt)` yields 32×32 images.

    The UNet keeps down/mid/up blocks with resnets and cross-attentions so block-level caches (DeepCache)
    find the structure they wrap.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    unet = _seeded(
        1,
        lambda: UNet2DConditionModel(
            sample_size=_LATENT_SIZE,  # the pipeline's default height/width is sample_size × VAE scale factor
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_HIDDEN,
            attention_head_dim=4,
            norm_num_groups=8,
        ).eval(),
    )
    pipe = StableDiffusionPipeline(
        vae=_seeded(2, lambda: _vae(scaling_factor=0.18215)),
        text_encoder=_seeded(3, lambda: _clip_text_encoder(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, dtype)


def build_tiny_flux(dtype: torch.dtype | None = None) -> FluxPipeline:
    """A FluxPipeline (dev-style, with guidance embedding) in miniature; `pipe(prompt)` yields 32×32 images.

    FluxPipeline hard-codes `default_sample_size = 128` in `__init__`, so it is overridden on the instance;
    it resets to 128 if the pipeline is saved and reloaded.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    transformer = _seeded(
        11,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,  # the pipeline packs 2×2 latent patches into tokens
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_HIDDEN,  # T5 d_model
            pooled_projection_dim=_HIDDEN,  # CLIP pooled output width
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        ).eval(),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_seeded(
            12,
            lambda: _vae(
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
            ),
        ),
        text_encoder=_seeded(13, lambda: _clip_text_encoder(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(14, lambda: _t5_text_encoder(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = _LATENT_SIZE
    return _finish(pipe, dtype)
