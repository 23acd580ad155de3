"""Tiny random Stable Diffusion folders of real architectures, for tests and for trying the engine in seconds.

Each is built from diffusers' and transformers' own classes at a small width, with random weights from a seed
(the same seed gives the same files), saved as a diffusers folder that `esd base import` and esd.models load:
  sd15    SD 1.x: CLIP text encoder, UNet with attention head dim 8, epsilon prediction
  sd21-v  SD 2.x 768-v: linear projections in the UNet's transformers, per-block head counts, v prediction
  sdxl    SDXL: two text encoders (the second with a projection, its pooled embedding and the size ids feeding
          the UNet's added "text_time" embedding), cross-attention over both encoders' tokens side by side
The toy world's vocabulary serves as tokenizer (no download).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from esd import arch_names

ARCHS = arch_names.TINY


def build(out: Path, arch: str = "sd15", seed: int = 0, dtype=None) -> Path:
    """Write a tiny random SD folder of ARCH to OUT (32x32 images); its weights stored in `dtype` (default fp32)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from esd import models  # noqa: F401  (quiet loading and saving: no progress bars of the libraries)
    from esd.toy import vocab

    arch_names.known(arch, ARCHS)
    sd2, xl = arch == "sd21-v", arch == "sdxl"
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab.build(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)

    def clip_config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width + 5, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(clip_config(32, "gelu" if sd2 else "quick_gelu"))
    # SDXL: the second encoder is wider and projects its pooled output; the UNet reads both encoders' tokens.
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(48, "gelu")) if xl else None
    xl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=48 + 6 * 8, transformer_layers_per_block=(1, 2)) if xl else {}
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48 if xl else 32, attention_head_dim=(2, 4) if sd2 or xl else 8,
        use_linear_projection=sd2 or xl, norm_num_groups=32, **xl_unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    if xl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
