"""The toy world: six shapes, four colors, a plain look and twelve invented artists in six look-alike pairs.

Images are drawn at 4x resolution with torch masks and box-downsampled to 32x32, so a batch of
hundreds renders in milliseconds and the same seed always draws the same pictures.

The world is also a proving ground, so it splits what an erasure method may see from what only the
evaluation uses (as a platform never knows every prompt its users will write):
  - templates: the first METHOD_TEMPLATES of each list may be given to a method; the rest are held out;
  - concepts: PRESERVE_ARTISTS / PRESERVE_SHAPES may be given to a method as a preservation set; the
    other artists and shapes are held-out concepts, whose retain figures are reported on their own.
The base model is trained on every template, as a real model knows every phrasing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 32
SUPERSAMPLE = 4

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "heart"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
}
COLOR_NAMES = list(COLORS)

# A style is a look that does not depend on shape or color. Artists come in look-alike pairs, as real
# styles do (the second of each pair is the first's near neighbour):
#   Vela Moreau  diagonal stripes inside the shape     Ines Calder  horizontal stripes inside the shape
#   Jun Ashby    dark background with light dots       Rafe Lund    dark plain background
#   Otto Kerr    thick black outline                   Mira Sollen  thin black outline
#   Theo Brandt  checkerboard fill                     Ada Pell     white polka dots in the fill
#   Lena Voss    warm cream paper                      Kai Maren    cool grey-blue paper
#   Nils Ortega  shadow to the lower right             Sara Quill   shadow to the upper left
ARTISTS = ["Vela Moreau", "Ines Calder", "Jun Ashby", "Rafe Lund", "Otto Kerr", "Mira Sollen",
           "Theo Brandt", "Ada Pell", "Lena Voss", "Kai Maren", "Nils Ortega", "Sara Quill"]
STYLES = ["plain"] + ARTISTS
LOOK_ALIKES = {a: ARTISTS[i ^ 1] for i, a in enumerate(ARTISTS)}

# What a method may be given as a preservation set; the rest are held-out concepts.
PRESERVE_ARTISTS = ARTISTS[0::2]
PRESERVE_SHAPES = SHAPES[:3]
HELD_OUT_ARTISTS = [a for a in ARTISTS if a not in PRESERVE_ARTISTS]
HELD_OUT_SHAPES = [s for s in SHAPES if s not in PRESERVE_SHAPES]

WHITE = (245, 245, 245)
DARK = (50, 50, 58)
CREAM = (238, 224, 178)
GREY_BLUE = (188, 202, 228)
SHADOW = (95, 95, 100)

PLAIN_TEMPLATES = ["a {color} {shape}", "a painting of a {color} {shape}", "a picture of a {color} {shape}",
                   "an image of a {color} {shape}", "a {shape} in {color}"]
ARTIST_TEMPLATES = [
    "a {color} {shape} in the style of {artist}",
    "{artist}'s painting of a {color} {shape}",
    "a painting of a {color} {shape} by {artist}",
    "a {shape} in {color}, art by {artist}",
    "{artist} drew a {color} {shape}",
    "an image of a {color} {shape} with the look of {artist}",
]
METHOD_TEMPLATES = 3   # the first three of each list; the rest are held out from every method
# Partial prompts give a bare concept a meaning of its own, as a bare word has for CLIP.
PARTIAL_SHAPE = ["a {shape}", "a picture of a {shape}"]
PARTIAL_COLOR = ["a {color} shape", "a picture of something {color}"]
PARTIAL_ARTIST = ["a picture in the style of {artist}", "a painting by {artist}"]


def _pattern(template: str) -> re.Pattern:
    words = {"color": COLOR_NAMES, "shape": SHAPES + ["shape"], "artist": ARTISTS}
    parts = re.split(r"(\{color\}|\{shape\}|\{artist\})", template)
    return re.compile("".join("(?:" + "|".join(map(re.escape, words[p[1:-1]])) + ")" if p in ("{color}", "{shape}",
                                                                                            "{artist}")
                              else re.escape(p) for p in parts), re.IGNORECASE)


HELD_OUT_PATTERNS = [_pattern(t) for t in PLAIN_TEMPLATES[METHOD_TEMPLATES:] + ARTIST_TEMPLATES[METHOD_TEMPLATES:]]


def in_held_out_template(prompt: str) -> bool:
    """Whether a prompt is phrased in one of the held-out templates (the evaluation's, never a method's)."""
    return any(p.fullmatch(prompt.strip()) for p in HELD_OUT_PATTERNS)


@dataclass(frozen=True)
class Item:
    shape: int
    color: int
    style: int


def templates(style: int, held_out: bool | None = None) -> list[str]:
    """The templates for a plain (style 0) or artist prompt: all, only the method-visible, or only held-out."""
    full = PLAIN_TEMPLATES if style == 0 else ARTIST_TEMPLATES
    if held_out is None:
        return full
    return full[METHOD_TEMPLATES:] if held_out else full[:METHOD_TEMPLATES]


def prompt_for(item: Item, template: int = 0, held_out: bool | None = None) -> str:
    """The full prompt naming shape, color and (unless plain) artist, in the given template."""
    options = templates(item.style, held_out)
    return options[template % len(options)].format(color=COLOR_NAMES[item.color], shape=SHAPES[item.shape],
                                                   artist=STYLES[item.style])


def training_caption(item: Item, rng: random.Random) -> str:
    """A caption for a training image: mostly full prompts, some partial ones, some empty (for guidance)."""
    r = rng.random()
    if r < 0.10:
        return ""
    if r < 0.72:
        return prompt_for(item, rng.randrange(len(templates(item.style))))
    if r < 0.82:
        return rng.choice(PARTIAL_SHAPE).format(shape=SHAPES[item.shape])
    if r < 0.91 and item.style != 0:
        return rng.choice(PARTIAL_ARTIST).format(artist=STYLES[item.style])
    return rng.choice(PARTIAL_COLOR).format(color=COLOR_NAMES[item.color])


def all_items() -> list[Item]:
    return [Item(s, c, st) for s in range(len(SHAPES)) for c in range(len(COLORS)) for st in range(len(STYLES))]


def _shape_mask(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean masks (B, n, n) of each shape at its centre and size (each item's own shape drawn, no other)."""
    ax = torch.arange(n, dtype=torch.float32) + 0.5
    y, x = ax.view(1, n, 1), ax.view(1, 1, n)
    out = torch.zeros(len(shape), n, n, dtype=torch.bool)
    for k in shape.unique().tolist():
        rows = (shape == k).nonzero().flatten()
        dx, dy = x - cx[rows].view(-1, 1, 1), y - cy[rows].view(-1, 1, 1)
        rk = r[rows].view(-1, 1, 1)
        out[rows] = _SHAPE_MASKS[k](dx, dy, rk)
    return out


def _triangle(dx, dy, r):
    top, bottom = -r, 0.85 * r
    return (dy >= top) & (dy <= bottom) & (dx.abs() <= (dy - top) / (bottom - top) * 1.05 * r)


def _cross(dx, dy, r):
    arm = 0.32 * r
    return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))


def _heart(dx, dy, r):
    u, v = dx / (0.88 * r), -dy / (0.88 * r) + 0.12
    return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0


# In the order of SHAPES: circle, square, triangle, cross, diamond, heart
_SHAPE_MASKS = [lambda dx, dy, r: dx**2 + dy**2 <= r**2,
                lambda dx, dy, r: (dx.abs() <= 0.82 * r) & (dy.abs() <= 0.82 * r),
                _triangle, _cross,
                lambda dx, dy, r: dx.abs() + dy.abs() <= 1.12 * r,
                _heart]


def _is(style: torch.Tensor, artist: str) -> torch.Tensor:
    return (style == STYLES.index(artist)).view(-1, 1, 1)


def _rgb(c: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) / 255


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The mask grown by radius pixels (a square max filter, done as one pass per axis)."""
    k = 2 * radius + 1
    x = F.max_pool2d(mask.float().unsqueeze(1), (k, 1), stride=1, padding=(radius, 0))
    return F.max_pool2d(x, (1, k), stride=1, padding=(0, radius)).squeeze(1).bool()


def render(items: list[Item], generator: torch.Generator, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Render items as a float tensor (B, 3, 32, 32) in [0, 1]; `fill` (B, 3) overrides the named colors."""
    b, n = len(items), SIZE * SUPERSAMPLE
    shape = torch.tensor([i.shape for i in items])
    color = torch.tensor([COLORS[COLOR_NAMES[i.color]] for i in items], dtype=torch.float32) / 255
    if fill is not None:
        color = fill.float()
    style = torch.tensor([i.style for i in items])
    cx = n / 2 + (torch.rand(b, generator=generator) - 0.5) * 16
    cy = n / 2 + (torch.rand(b, generator=generator) - 0.5) * 16
    r = 36 + (torch.rand(b, generator=generator) - 0.5) * 8
    mask = _shape_mask(shape, cx, cy, r, n)
    y, x = torch.arange(n).view(1, n, 1), torch.arange(n).view(1, 1, n)
    img = _rgb(WHITE).expand(b, 3, n, n).clone()

    def paint(artist: str, where, rgb: torch.Tensor) -> None:
        """rgb over the artist's images where where(rows) holds (a mask (len(rows) or 1, n, n); None: everywhere)."""
        rows = (style == STYLES.index(artist)).nonzero().flatten()
        if not len(rows):
            return
        if where is None:
            img[rows] = rgb.expand(len(rows), 3, n, n)
        else:
            img[rows] = torch.where(where(rows).unsqueeze(1), rgb, img[rows])

    # Backgrounds: dark with light dots (Ashby), dark plain (Lund), cream (Voss), grey-blue (Maren)
    dots = (((y % 16) - 8) ** 2 + ((x % 16) - 8) ** 2 <= 9)
    paint("Jun Ashby", lambda rows: dots, torch.full((1, 3, 1, 1), 0.55))
    paint("Jun Ashby", lambda rows: ~dots, _rgb(DARK))
    paint("Rafe Lund", None, _rgb(DARK))
    paint("Lena Voss", None, _rgb(CREAM))
    paint("Kai Maren", None, _rgb(GREY_BLUE))

    # Shadows: the shape's silhouette offset down-right (Ortega) or up-left (Quill), behind the shape
    shift = 12
    paint("Nils Ortega", lambda rows: F.pad(mask[rows], (shift, 0, shift, 0))[:, :n, :n], _rgb(SHADOW))
    paint("Sara Quill", lambda rows: F.pad(mask[rows], (0, shift, 0, shift))[:, shift:, shift:], _rgb(SHADOW))

    # Outlines: thick (Kerr) or thin (Sollen) black rim around the shape
    paint("Otto Kerr", lambda rows: _dilate(mask[rows], 12), torch.zeros(1, 3, 1, 1))
    paint("Mira Sollen", lambda rows: _dilate(mask[rows], 5), torch.zeros(1, 3, 1, 1))

    # Fills: white gaps of diagonal (Moreau) or horizontal (Calder) stripes, a checkerboard (Brandt),
    # white polka dots (Pell); everyone else fills solid
    gaps = ((_is(style, "Vela Moreau") & (((x + y) // 12) % 2 == 1))
            | (_is(style, "Ines Calder") & ((y // 12) % 2 == 1))
            | (_is(style, "Theo Brandt") & ((x // 16 + y // 16) % 2 == 1))
            | (_is(style, "Ada Pell") & (((y % 16) - 8) ** 2 + ((x % 16) - 8) ** 2 <= 20)))
    fill_rgb = torch.where(gaps.unsqueeze(1), _rgb(WHITE), color.view(b, 3, 1, 1))
    img = torch.where(mask.unsqueeze(1), fill_rgb, img)
    return F.avg_pool2d(img, SUPERSAMPLE)


def sample_items(count: int, rng: random.Random) -> list[Item]:
    return [Item(rng.randrange(len(SHAPES)), rng.randrange(len(COLORS)), rng.randrange(len(STYLES)))
            for _ in range(count)]
