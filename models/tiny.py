"""Tiny SD1-style and SDXL-style pipelines, built offline from configs (tests, the demo, CI).

They have the block structure of the real models (four SD1 stages with two resnet+attention pairs per
down stage and three per up stage; SDXL's three stages with transformer depths 1/2/10 and a text_time
embedding), so every removal preset applies to them unchanged, but only a few hundred thousand
parameters. Weights are deterministic from a seed; the tokenizer is a small word-level BPE made here.
Saved with save_pretrained, they load in plain diffusers pipelines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

# Enough words for the built-in shapes captions and the usual test prompts; anything else still
# tokenizes, character by character.
VOCAB_WORDS = (
    "a an the of on in at and with to two three four five one small large big medium tiny "
    "red green blue yellow orange purple white black gray grey pink brown cyan "
    "circle circles square squares triangle triangles star stars shape shapes "
    "top bottom left right center middle background photo picture image of cat dog "
    "painting astronaut riding horse mountain sky sea portrait"
).split()

SD1_UNET = dict(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    in_channels=4,
    out_channels=4,
)

SDXL_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    cross_attention_dim=64,  # 32 (text encoder 1) + 32 (text encoder 2)
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text embedding
    norm_num_groups=8,
    in_channels=4,
    out_channels=4,
)

VAE = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    in_channels=3,
    out_channels=3,
)  # downsamples by 4: a 64 px image is a 4x16x16 latent


def text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    """The tiny CLIP text encoder's config (32 wide, VOCAB_WORDS' vocabulary); with projection_dim, SDXL's second."""
    kw = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )
    if projection_dim:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make each word of VOCAB_WORDS a single token."""
    # CLIP's byte-to-unicode table: every byte is one printable character, so any text encodes.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in VOCAB_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "r e", "re d</w>"
            pair = f"{pieces[0]} {pieces[1]}"
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)
    return tok


def load_tokenizer() -> CLIPTokenizer:
    """The tiny tokenizer (build_tokenizer), loaded."""
    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d)


def sd1_scheduler() -> DDIMScheduler:
    """SD 1.x's DDIM scheduler settings."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_sd1_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, **SD1_UNET)
    vae = AutoencoderKL(sample_size=64, **VAE)
    text_encoder = CLIPTextModel(text_config())
    scheduler = DDIMScheduler.from_config(sd1_scheduler().config, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, **SDXL_UNET)
    vae = AutoencoderKL(sample_size=64, **VAE)
    te1 = CLIPTextModel(text_config())
    te2 = CLIPTextModelWithProjection(text_config(projection_dim=32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    tok = load_tokenizer()
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te1.eval(),
        text_encoder_2=te2.eval(),
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def tiny_decoder(seed: int = 0) -> AutoencoderTiny:
    """A TAESD-style AutoencoderTiny for the tiny teachers' latent space (4 channels, 4x upsampling: 16x16 -> 64 px),
    random weights: a lighter decoder in tests, as TAESD (madebyollin/taesd) is for SD 1.x/2.x."""
    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)


BUILDERS = {"tiny-sd1": tiny_sd1_pipeline, "tiny-sdxl": tiny_sdxl_pipeline, "tiny-decoder": tiny_decoder}


def save_tiny(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline (or decoder) by name and save it as a diffusers folder; returns the folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(BUILDERS)}")
    out = Path(out_dir)
    BUILDERS[name](seed=seed).save_pretrained(out)
    return out
