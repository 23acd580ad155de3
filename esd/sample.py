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


def grid(rows: list[torch.Tensor], scale: int = 4, row_labels: list[str] | None = None,
         col_labels: list[str] | None = None, title: str | None = None) -> Image.Image:
    """A picture grid: rows of (N, 3, H, W) images in [0, 1], each image enlarged scale times; optionally a label
    left of each row (its prompt), a title above each column and a title line on top."""
    h, w = rows[0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * (h + 2), cols * (w + 2))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[:, i * (h + 2) + 1:i * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = img
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
    if not (row_labels or col_labels or title):
        return img
    return _labelled(img, len(rows), cols, row_labels or [], col_labels or [], title)


def _labelled(img: Image.Image, n_rows: int, n_cols: int, row_labels: list[str], col_labels: list[str],
              title: str | None) -> Image.Image:
    """The grid on a white page with its labels (Pillow's built-in font: no font files needed)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: int(measure.textlength(t, font=font))
    pad, line = 8, 20
    left = (max(map(text_w, row_labels)) + 2 * pad) if row_labels else 0
    top = (line if title else 0) + (line if col_labels else 0) + (pad if title or col_labels else 0)
    page = Image.new("RGB", (max(left + img.width, text_w(title or "") + 2 * pad), top + img.height), "white")
    page.paste(img, (left, top))
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((pad, pad // 2), title, fill="black", font=font)
    cell_w, cell_h = img.width / n_cols, img.height / n_rows
    for j, label in enumerate(col_labels):
        x = left + j * cell_w + (cell_w - text_w(label)) / 2
        draw.text((x, top - line), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        draw.text((pad, top + i * cell_h + (cell_h - line) / 2 + 3), label, fill="black", font=font)
    return page
