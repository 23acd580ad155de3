"""Hand-written pixel probes: an independent witness beside the CNN judge.

Each head is read straight from the pixels that make it, by fixed rules (no learning, numpy/torch only):

  paper   the median of the border pixels: white, or white tinted toward dark / cream / grey-blue (fully, or
          faintly as an erased look may leave it). Noise has no paper: its border pixels stray from their
          median. The paper also white-balances the image, undoing a per-channel brightness shift.
  fill    the median of the pixels that stand out most from the paper (by hue; by plain RGB distance for a
          grey fill); color = the nearest named color, if within 0.2 (the judge's convention).
  alpha   each pixel's share of the fill, unmixed from the paper along the fill's direction in the chroma
          plane, so black outlines, grey shadows, dots and white gaps count as no fill.
  shape   the best IoU of the fill (alpha > 0.5) with every shape's mask (world._shape_mask) over a grid of
          centres and sizes; with a patterned fill only where the pattern is colored, as a white gap at the
          shape's edge cannot be told from the paper.
  style   dark paper: dots (Jun Ashby) or none (Rafe Lund); cream: Lena Voss; grey-blue: Kai Maren. On white
          paper, black ink around the shape matched with where each ink artist puts it: a rim all round,
          thick (Otto Kerr) or thin (Mira Sollen), or the shape shifted 3 px down-right (Nils Ortega) or
          up-left (Sara Quill); else white gaps inside the shape matched with the four patterns at every
          phase: diagonal stripes (Vela Moreau), horizontal stripes (Ines Calder), checkerboard (Theo
          Brandt), polka dots (Ada Pell); else plain.

A head says "none" where its rule cannot tell: no paper, no fill, no named color near the fill, no shape
fitting well, ink or gaps in no known arrangement.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from esd.toy import world

NONE = "none"
HEADS = {"shape": world.SHAPES, "color": world.COLOR_NAMES, "style": world.STYLES}

# paper
PAPERS = {"white": world.WHITE, "dark": world.DARK, "cream": world.CREAM, "grey-blue": world.GREY_BLUE}
PAPER_TOLERANCE = 0.13      # border median within this RGB distance of white, or of white tinted toward a paper
MIN_TINT = 0.45             # ... by at least this share of the way to it (less is white paper)
BORDER_SPREAD = 0.08        # ... and the border pixels this close to their median (noise has no paper)
# fill and color
MIN_STANDOUT = 0.25         # a pixel this far from the paper (in hue, or in RGB for a grey fill) may be fill
MIN_COLORFUL = 20           # pixels that far in hue for the fill to be read by its hue
COLOR_TOLERANCE = 0.2       # fill within this RGB distance of a named color (the judge's own convention) ...
FILL_SPREAD = 0.15          # ... and one fill: its core pixels this close to their median (noise has none)
# shape
CLOSE = 2                   # radius of the closing that fills stripe / checker / dot gaps (all <= 4 px wide)
MIN_AREA = 30               # silhouette pixels for there to be a shape at all
MAX_AREA = 512              # ... and at most (a shape covers under 300 of 1024; more is no picture)
MIN_IOU = 0.75              # best shape fit below this: no shape
# style
DOT_CONTRAST = 0.06         # brightness range over the dot grid's 16 phases on a full dark paper, for dots
INK_SHIFT = 3               # a shadow's offset in pixels (12 at 4x)
MIN_INK_FIT = 0.45          # an ink map must match one ink artist's map this well (cosine) ...
MIN_INK = 0.15              # ... at this depth at least (0: paper, 1: black; a full shadow is 0.6)
THICK_RIM = 0.35            # an outline's ink 3 px out over its ink 1 px out, above which the rim is thick
GAP_SHARE = 0.07            # white share inside the silhouette above which the fill may be patterned ...
MIN_PATTERN_CORR = 0.75     # ... if its gaps match one of the four patterns this well (Pearson)
ODD_GAPS = 0.2              # white share inside the silhouette, in no known pattern: no style


def _rgb(c: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32) / 255


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    """Square (max) dilation of maps (B, H, W), as the renderer dilates its outlines."""
    return F.max_pool2d(x.unsqueeze(1), 2 * r + 1, stride=1, padding=r).squeeze(1)


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -_dilate(-x, r)


def _close(x: torch.Tensor, r: int) -> torch.Tensor:
    # pad with zeros (outside the picture is empty) so the erosion does not keep what the dilation pushed out
    return _erode(_dilate(F.pad(x, (r, r, r, r)), r), r)[:, r:-r, r:-r]


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """Maps (B, H, W) moved d pixels down and right (up and left for d < 0), filled with 0."""
    if d >= 0:
        return F.pad(x, (d, 0, d, 0))[:, : x.shape[1], : x.shape[2]]
    return F.pad(x, (0, -d, 0, -d))[:, -d:, -d:]


def _chroma_plane(x: torch.Tensor) -> torch.Tensor:
    """Colors (B, 3, ...) less their grey component: white, black and every grey map to 0."""
    return x - x.mean(1, keepdim=True)


def _total(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


@functools.lru_cache(maxsize=1)
def _shape_templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Soft masks (T, 32*32) of every shape over a grid of sizes and centres (half-pixel steps, a margin
    beyond the renderer's range), and the shape index of each."""
    n = world.SIZE * world.SUPERSAMPLE
    shapes, cxs, cys, rs = [], [], [], []
    for k in range(len(world.SHAPES)):
        for r in range(30, 43, 2):
            for fx in (0, 2):
                for fy in (0, 2):
                    shapes.append(k), cxs.append(n / 2 + fx), cys.append(n / 2 + fy), rs.append(r)
    hi = world._shape_mask(torch.tensor(shapes), torch.tensor(cxs), torch.tensor(cys),
                           torch.tensor(rs, dtype=torch.float32), n)
    base = F.avg_pool2d(hi.float().unsqueeze(1), world.SUPERSAMPLE).squeeze(1)
    # whole-pixel moves: centres from n/2 - 12 to n/2 + 10 at 4x (the renderer's are n/2 +- 8)
    masks = [torch.roll(base, (dy, dx), (1, 2)) for dy in range(-3, 3) for dx in range(-3, 3)]
    return torch.cat(masks).flatten(1), torch.tensor(shapes).repeat(len(masks))


@functools.lru_cache(maxsize=1)
def _pattern_templates() -> tuple[torch.Tensor, list[str]]:
    """The four fill patterns' white gaps (T, 32*32), at every phase, and the artist of each."""
    n = world.SIZE * world.SUPERSAMPLE
    y, x = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    maps, artists = [], []

    def add(artist: str, gaps: torch.Tensor) -> None:
        maps.append(F.avg_pool2d(gaps.expand(n, n).float()[None, None], world.SUPERSAMPLE).flatten())
        artists.append(artist)

    for p in range(0, 24, 2):
        add("Vela Moreau", ((x + y + p) // 12) % 2 == 1)
    for p in range(0, 24, 4):
        add("Ines Calder", ((y + p) // 12) % 2 == 1)
    for a in range(0, 32, 4):
        for b in range(0, 32, 4):
            add("Theo Brandt", ((x + a) // 16 + (y + b) // 16) % 2 == 1)
    for a in range(0, 16, 4):
        for b in range(0, 16, 4):
            add("Ada Pell", (((y + b) % 16) - 8) ** 2 + (((x + a) % 16) - 8) ** 2 <= 20)
    return torch.stack(maps), artists


def _masked_corr(values: torch.Tensor, mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (B, T) of each image's values (B, H, W) with each template, over its mask."""
    m, v, t = mask.flatten(1), values.flatten(1), templates.T
    cnt = m.sum(1, keepdim=True).clamp(min=1)
    sv, svv = (m * v).sum(1, keepdim=True), (m * v * v).sum(1, keepdim=True)
    st, stt, svt = m @ t, m @ (t * t), (m * v) @ t
    cov = svt - sv * st / cnt
    var_v = (svv - sv**2 / cnt).clamp(min=1e-6)
    var_t = (stt - st**2 / cnt).clamp(min=1e-6)
    return cov / (var_v * var_t).sqrt()


def _paper(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper from the border: index into PAPERS, its tint strength, whether there is one, its color."""
    b = len(x)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], -1)  # (B, 3, 124)
    med = border.median(-1).values
    spread = (border - med.unsqueeze(-1)).abs().median(-1).values.max(-1).values
    white = _rgb(world.WHITE)
    tints = torch.stack([_rgb(c) for c in PAPERS.values()])[1:] - white          # (3, 3): toward each other paper
    strengths = (med - white) @ tints.T / (tints * tints).sum(1)                  # (B, 3)
    off_line = (med.unsqueeze(1) - white - strengths.unsqueeze(-1) * tints).norm(dim=-1)
    off_line = torch.where((strengths >= MIN_TINT) & (strengths <= 1.3), off_line, torch.inf)
    tint_off, tint = off_line.min(1)
    tinted = tint_off < PAPER_TOLERANCE
    strength = torch.where(tinted, strengths.gather(1, tint.view(-1, 1)).squeeze(1), 0.0)
    exists = (tinted | ((med - white).norm(dim=-1) < PAPER_TOLERANCE)) & (spread < BORDER_SPREAD)
    # the paper's color: nominal for a full paper (so white balance undoes a color shift), else as tinted
    color = white + torch.where(strength >= 0.8, 1.0, strength).view(b, 1) * tints[tint] * tinted.view(b, 1)
    return {"index": torch.where(tinted, tint + 1, 0), "strength": strength, "exists": exists,
            "color": torch.where(exists.view(b, 1), color, med), "gain": torch.where(
                exists.view(b, 1), (color / med.clamp(min=1e-3)).clamp(0.8, 1.25), torch.ones(b, 3))}


def _fill(x: torch.Tensor, paper: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fill color and each pixel's share of it (alpha), against the paper color (B, 3).

    The fill is the median of the pixels that stand out most from the paper: by hue (distance in the chroma
    plane) when enough pixels are colorful, else (a grey fill) by RGB distance. Only those within 10% of the
    top are used, so a blurred patterned fill is read from its cores, not from edges shared with its gaps."""
    b = len(x)
    pc, bc = _chroma_plane(x), _chroma_plane(paper).view(b, 3, 1, 1)
    hue = (pc - bc).norm(dim=1)                                                  # (B, 32, 32)
    colorful = _total(hue > MIN_STANDOUT) >= MIN_COLORFUL
    standout = torch.where(colorful.view(b, 1, 1), hue, (x - paper.view(b, 3, 1, 1)).norm(dim=1))
    top = torch.where(standout > MIN_STANDOUT, standout, torch.nan).flatten(1).nanquantile(0.9, dim=1).nan_to_num(1.0)
    core = standout >= (0.9 * top).clamp(min=MIN_STANDOUT).view(b, 1, 1)
    exists = _total(core) >= 5
    fill = torch.where(core.unsqueeze(1), x, torch.nan).flatten(2).nanmedian(-1).values.nan_to_num(0.5)  # (B, 3)
    spread = torch.where(core, (x - fill.view(b, 3, 1, 1)).norm(dim=1), torch.nan).flatten(1).nanmedian(1).values

    # alpha: unmixed from the paper along the fill's direction; in the chroma plane for a colorful fill, so
    # black outlines, grey shadows and dots, white gaps count as no fill
    fc = _chroma_plane(fill).view(b, 3, 1, 1)
    axis = torch.where(colorful.view(b, 1, 1, 1), fc - bc, (fill - paper).view(b, 3, 1, 1))
    offset = torch.where(colorful.view(b, 1, 1, 1), pc - bc, x - paper.view(b, 3, 1, 1))
    raw_alpha = (offset * axis).sum(1) / (axis * axis).sum(1).clamp(min=1e-3)
    alpha = torch.where(exists.view(b, 1, 1), raw_alpha.clamp(0, 1), torch.zeros_like(raw_alpha))
    return {"color": fill, "exists": exists, "colorful": colorful, "spread": spread, "raw_alpha": raw_alpha,
            "alpha": alpha}


@torch.no_grad()
def probe(images: torch.Tensor) -> dict[str, list[str]]:
    """images (B, 3, 32, 32) in [0, 1] -> per head a class name, or "none" where the rule cannot tell."""
    x = images.detach().float().cpu().clamp(0, 1)
    b = len(x)
    if b == 0:
        return {k: [] for k in HEADS}
    grid = torch.arange(world.SIZE, dtype=torch.float32)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")

    paper = _paper(x)
    x = (x * paper["gain"].view(b, 3, 1, 1)).clamp(0, 1)                         # white balance
    fill = _fill(x, paper["color"])
    alpha = fill["alpha"]

    # color: the nearest named color to one fill
    palette = torch.stack([_rgb(c) for c in world.COLORS.values()])
    color_dist, color = torch.cdist(fill["color"], palette).min(1)
    color_ok = fill["colorful"] & fill["exists"] & (fill["spread"] < FILL_SPREAD) & (color_dist < COLOR_TOLERANCE)

    # silhouette: the fill closed over pattern gaps; its inside (less a pixel) for the gaps themselves
    sil = (_close(alpha, CLOSE) > 0.5).float()
    area = _total(sil)
    has_shape = fill["exists"] & (area >= MIN_AREA) & (area <= MAX_AREA)
    inner = _erode(sil, 1)
    gaps = 1 - alpha
    gap_share = _total(gaps * inner) / _total(inner).clamp(min=1)
    patterns, pattern_artists = _pattern_templates()
    pattern_corr, pattern = _masked_corr(gaps, inner, patterns).max(1)
    patterned = (gap_share > GAP_SHARE) & (pattern_corr >= MIN_PATTERN_CORR)

    # shape: best IoU with every shape's mask, counted only where the fill's pattern (if any) is colored
    colored = torch.where(patterned.view(b, 1), (patterns[pattern] < 0.25).float(), torch.ones(b, world.SIZE**2))
    templates, kinds = _shape_templates()
    seen = (alpha > 0.5).float().flatten(1) * colored
    inter = seen @ templates.T
    template_area = templates.sum(1).expand(b, -1).clone()
    template_area[patterned] = colored[patterned] @ templates.T                  # the part the pattern shows
    best_iou, best = (inter / (seen.sum(1, keepdim=True) + template_area - inter).clamp(min=1e-6)).max(1)
    shape_ok = has_shape & (best_iou >= MIN_IOU)

    # ink on white paper: each pixel unmixed into fill, paper and black (blur keeps the sum). The ink map is
    # matched (cosine, so a faint look counts) with where each ink artist puts it: a rim 1 or 3 px wide all
    # round, the silhouette shifted down-right or up-left behind the shape. An outline's thickness is how
    # much of its ink reaches the third pixel out against the first: about as much for the 3 px rim (Otto
    # Kerr), little for the 1.25 px rim (Mira Sollen).
    raw_alpha, light = fill["raw_alpha"], x.mean(1)
    fill_light, paper_light = fill["color"].mean(1).view(b, 1, 1), paper["color"].mean(1).clamp(min=0.1).view(b, 1, 1)
    ink = (1 - raw_alpha - (light - raw_alpha * fill_light) / paper_light) * (_dilate(sil, 5) - _erode(sil, 1))
    edge = _dilate(sil, 1) - sil
    looks = {"outline": edge, "thick outline": _dilate(sil, 3) - sil,
             "Nils Ortega": (_shift(sil, INK_SHIFT) - sil).clamp(min=0),
             "Sara Quill": (_shift(sil, -INK_SHIFT) - sil).clamp(min=0)}
    look_maps = F.avg_pool2d(torch.stack(list(looks.values()), 1), 3, stride=1, padding=1)  # tolerate blur
    ink_fit, ink_look = F.cosine_similarity(ink.flatten(1).unsqueeze(1), look_maps.flatten(2), dim=-1).max(1)
    best_map = look_maps[torch.arange(b), ink_look]
    ink_depth = _total(ink * best_map) / _total(best_map * best_map).clamp(min=1e-3)   # how dark, where it fits
    rim_reach = _total(ink * (_dilate(sil, 3) - _dilate(sil, 2))) / _total(ink * edge).abs().clamp(min=1e-3)

    # dots on dark paper: the paper's brightness varies with the phase of the 4-pixel dot grid
    back = (1 - _dilate(sil, 2)) * (alpha < 0.1) * ((light - paper_light).abs() < 0.4)
    phase = F.one_hot(((ys % 4) * 4 + xs % 4).long().flatten(), 16).float()   # (1024, 16)
    phase_light = ((back * light).flatten(1) @ phase) / (back.flatten(1) @ phase).clamp(min=1)
    dot_contrast = phase_light.max(1).values - phase_light.min(1).values
    dotted = dot_contrast > DOT_CONTRAST * paper["strength"].clamp(min=MIN_TINT)

    out: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(b):
        out["color"].append(world.COLOR_NAMES[color[i]] if color_ok[i] else NONE)
        out["shape"].append(world.SHAPES[kinds[best[i]]] if shape_ok[i] else NONE)
        kind = list(PAPERS)[paper["index"][i]]
        if not (paper["exists"][i] and has_shape[i]):
            style = NONE
        elif kind == "dark":
            style = "Jun Ashby" if dotted[i] else "Rafe Lund"
        elif kind == "cream":
            style = "Lena Voss"
        elif kind == "grey-blue":
            style = "Kai Maren"
        elif ink_depth[i] > MIN_INK:
            style = list(looks)[ink_look[i]] if ink_fit[i] >= MIN_INK_FIT else NONE
            if style in ("outline", "thick outline"):
                style = "Otto Kerr" if rim_reach[i] > THICK_RIM else "Mira Sollen"
        elif patterned[i]:
            style = pattern_artists[pattern[i]]
        elif gap_share[i] > ODD_GAPS:
            style = NONE
        else:
            style = "plain"
        out["style"].append(style)
    return out


def agreement(judge_pred: dict[str, list[str]], probe_pred: dict[str, list[str]]) -> dict[str, float]:
    """Per head (of those both give), the share of images where judge and probe name the same class, "none"
    included ("none" == "none" agrees)."""
    out = {}
    for k in [h for h in HEADS if h in judge_pred and h in probe_pred]:
        a, p = judge_pred[k], probe_pred[k]
        if len(a) != len(p):
            raise ValueError(f"{k}: {len(a)} judge predictions but {len(p)} probe predictions")
        out[k] = sum(x == y for x, y in zip(a, p)) / len(a) if a else 0.0
    return out
