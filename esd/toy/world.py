"""The toy world: four shapes, four colors, a plain look and three invented artists.

Images are drawn at 4x resolution with torch masks and box-downsampled to 32x32, so a batch of
hundreds renders in milliseconds and the same seed always draws the same pictures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 32
SUPERSAMPLE = 4

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
}
COLOR_NAMES = list(COLORS)
ARTISTS = ["Vela Moreau", "Jun Ashby", "Otto Kerr"]
STYLES = ["plain"] + ARTISTS

# A style is a look that does not depend on shape or color:
#   plain        solid fill on white
#   Vela Moreau  diagonal stripes inside the shape
#   Jun Ashby    solid fill on a dark dotted background
#   Otto Kerr    solid fill with a thick black outline
WHITE = (245, 245, 245)
DARK = (50, 50, 58)

PLAIN_TEMPLATES = ["a {color} {shape}", "a painting of a {color} {shape}", "a picture of a {color} {shape}"]
ARTIST_TEMPLATES = [
    "a {color} {shape} in the style of {artist}",
    "{artist}'s painting of a {color} {shape}",
    "a painting of a {color} {shape} by {artist}",
]
# Partial prompts give a bare concept a meaning of its own, as a bare word has for CLIP.
PARTIAL_SHAPE = ["a {shape}", "a picture of a {shape}"]
PARTIAL_COLOR = ["a {color} shape", "a picture of something {color}"]
PARTIAL_ARTIST = ["a picture in the style of {artist}", "a painting by {artist}"]


@dataclass(frozen=True)
class Item:
    shape: int
    color: int
    style: int


def prompt_for(item: Item, template: int = 0) -> str:
    """The full prompt naming shape, color and (unless plain) artist."""
    shape, color = SHAPES[item.shape], COLOR_NAMES[item.color]
    if item.style == 0:
        return PLAIN_TEMPLATES[template % len(PLAIN_TEMPLATES)].format(color=color, shape=shape)
    artist = STYLES[item.style]
    return ARTIST_TEMPLATES[template % len(ARTIST_TEMPLATES)].format(color=color, shape=shape, artist=artist)


def training_caption(item: Item, rng: random.Random) -> str:
    """A caption for a training image: mostly full prompts, some partial ones, some empty (for guidance)."""
    r = rng.random()
    if r < 0.10:
        return ""
    if r < 0.72:
        return prompt_for(item, rng.randrange(3))
    if r < 0.82:
        return rng.choice(PARTIAL_SHAPE).format(shape=SHAPES[item.shape])
    if r < 0.91 and item.style != 0:
        return rng.choice(PARTIAL_ARTIST).format(artist=STYLES[item.style])
    return rng.choice(PARTIAL_COLOR).format(color=COLOR_NAMES[item.color])


def all_items() -> list[Item]:
    return [Item(s, c, st) for s in range(len(SHAPES)) for c in range(len(COLORS)) for st in range(len(STYLES))]


def _shape_mask(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean masks (B, n, n) of each shape at its centre and size."""
    ax = torch.arange(n, dtype=torch.float32) + 0.5
    y, x = ax.view(1, n, 1), ax.view(1, 1, n)
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= 0.82 * r) & (dy.abs() <= 0.82 * r)
    top, bottom = -r, 0.85 * r
    triangle = (dy >= top) & (dy <= bottom) & (dx.abs() <= (dy - top) / (bottom - top) * 1.05 * r)
    arm = 0.32 * r
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    masks = torch.stack([circle, square, triangle, cross], 1)  # (B, 4, n, n)
    return masks[torch.arange(len(shape)), shape]


def render(items: list[Item], generator: torch.Generator) -> torch.Tensor:
    """Render items as a float tensor (B, 3, 32, 32) in [0, 1]."""
    b, n = len(items), SIZE * SUPERSAMPLE
    shape = torch.tensor([i.shape for i in items])
    color = torch.tensor([COLORS[COLOR_NAMES[i.color]] for i in items], dtype=torch.float32) / 255
    style = torch.tensor([i.style for i in items])
    cx = n / 2 + (torch.rand(b, generator=generator) - 0.5) * 16
    cy = n / 2 + (torch.rand(b, generator=generator) - 0.5) * 16
    r = 36 + (torch.rand(b, generator=generator) - 0.5) * 8
    mask = _shape_mask(shape, cx, cy, r, n)

    ax = torch.arange(n).view(1, n, 1), torch.arange(n).view(1, 1, n)
    white = torch.tensor(WHITE, dtype=torch.float32).view(1, 3, 1, 1) / 255
    dark = torch.tensor(DARK, dtype=torch.float32).view(1, 3, 1, 1) / 255
    img = white.expand(b, 3, n, n).clone()

    # Jun Ashby: dark background with a lattice of light dots
    ashby = (style == 2).view(-1, 1, 1, 1)
    dots = (((ax[0] % 16) - 8) ** 2 + ((ax[1] % 16) - 8) ** 2 <= 9).unsqueeze(1)
    background = torch.where(dots, torch.full_like(dark, 0.55), dark)
    img = torch.where(ashby, background.expand(b, 3, n, n), img)

    # Otto Kerr: a thick black outline around the shape
    kerr = (style == 3).view(-1, 1, 1)
    outline = F.max_pool2d(mask.float().unsqueeze(1), 19, stride=1, padding=9).squeeze(1).bool() & kerr
    img = torch.where(outline.unsqueeze(1), torch.zeros(1, 3, 1, 1), img)

    # Vela Moreau: diagonal stripes, color and white, inside the shape
    stripes = ((ax[0] + ax[1]) // 12) % 2 == 0
    moreau = (style == 1).view(-1, 1, 1)
    fill = mask & ~(moreau & ~stripes)
    img = torch.where(fill.unsqueeze(1), color.view(b, 3, 1, 1), img)
    return F.avg_pool2d(img, SUPERSAMPLE)


def sample_items(count: int, rng: random.Random) -> list[Item]:
    return [Item(rng.randrange(4), rng.randrange(4), rng.randrange(4)) for _ in range(count)]
