"""How big a delta is against its full UNet, from parameter counts alone (no weights: meta device)."""

from __future__ import annotations

from esd import methods

# The UNet of Stable Diffusion 1.x (CompVis/stable-diffusion-v1-4, unet/config.json).
SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def method_fraction(unet_config: dict, method: str = "esd-x") -> dict:
    """Parameters a method changes / all UNet parameters, for a UNet config. With equal dtypes this is the
    delta's share of the UNet's bytes (plus a few KB of manifest and pyfunc files per version)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    total = sum(p.numel() for p in unet.parameters())
    selected = methods.count(unet, method)
    return {"method": method, "parameters": selected, "unet_parameters": total, "fraction": selected / total}
