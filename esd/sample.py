"""Prompts x seeds -> images, batched, one generator per image so each (prompt, seed) is reproducible."""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for each pair (prompts[i], seeds[i])."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="sample", disable=not progress, leave=False):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        latents = torch.stack([torch.randn(pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                                           size // pipe.vae_scale_factor, generator=g) for g in gens])
        images = pipe(prompts[i:i + batch], height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance, latents=latents.to(pipe.unet.device, pipe.unet.dtype),
                      output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def to_uint8(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> uint8 numpy (N, H, W, 3), as image files and the served model give them."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def grid(rows: list[torch.Tensor], scale: int = 4) -> Image.Image:
    """A picture grid: rows of (N, 3, H, W) images in [0, 1], each image enlarged scale times."""
    h, w = rows[0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * (h + 2), cols * (w + 2))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[:, i * (h + 2) + 1:i * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = img
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
