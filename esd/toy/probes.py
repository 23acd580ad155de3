"""Hand-written pixel probes: an independent witness beside the CNN judge.

Each head is read straight from the pixels that make it, with fixed rules and no learning:

  background  the median of the border pixels, matched to the four papers (white, dark, cream, grey-blue);
              it also white-balances the image (undoing a per-channel brightness shift);
  color       the median of the most saturated pixels, matched to the nearest named color;
  silhouette  each pixel's share of that color (unmixed from the paper in the chroma plane, so black
              outlines, grey shadows, dots and white gaps count as no color), closed to fill pattern gaps;
  shape       the best IoU of the silhouette with every shape's mask (world._shape_mask) over a grid of
              centres and sizes, both closed alike;
  style       the paper for the four background artists (dots on dark paper: Jun Ashby, else Rafe Lund);
              on white paper, a black rim (thick: Otto Kerr, thin: Mira Sollen), else grey shadow pixels
              (lower right: Nils Ortega, upper left: Sara Quill), else white gaps inside the silhouette
              matched to stripes (diagonal: Vela Moreau, horizontal: Ines Calder), a checkerboard (Theo
              Brandt) or polka dots (Ada Pell), else plain.

Each head says "none" when its rule cannot tell (no known paper, no named color, no fitting shape).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from esd.toy import world

NONE = "none"
HEADS = {"shape": world.SHAPES, "color": world.COLOR_NAMES, "style": world.STYLES}

PAPERS = {"white": world.WHITE, "dark": world.DARK, "cream": world.CREAM, "grey-blue": world.GREY_BLUE}
PAPER_TOLERANCE = 0.15      # border median within this RGB distance of a paper
BORDER_SPREAD = 0.08        # ... and its pixels this close to their median (noise has no paper)
COLOR_TOLERANCE = 0.2       # fill within this RGB distance of a named color (the judge's own convention)
MIN_CHROMA = 0.25           # a pixel this saturated may carry the fill color
MIN_AREA = 30               # silhouette pixels for there to be a shape at all
MIN_IOU = 0.75              # best shape fit below this: no shape
CLOSE = 2                   # radius of the closing that fills stripe / checker / dot gaps (their width <= 4 px)
GAP_SHARE = 0.14            # white share inside the silhouette above which the fill is patterned
MIN_PATTERN_CORR = 0.6      # a patterned fill must match one of the four patterns this well
MIN_INK = 0.5               # black ink per perimeter pixel, on one side at least, for an outline or a shadow
ONE_SIDED = 0.5             # ... with less than this share of it on the other side: a shadow
THICK_RIM = 2.3             # an all-round rim wider than this is thick (Otto Kerr 3 px, Mira Sollen 1.25 px)


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


def _chroma_plane(x: torch.Tensor) -> torch.Tensor:
    """Drop the grey component along the channel axis (dim 1): neutrals (white, black, grey) map to 0."""
    return x - x.mean(1, keepdim=True)


@functools.lru_cache(maxsize=1)
def _shape_templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Soft masks (T, 32*32) of every shape over a grid of centres (half-pixel steps) and sizes; the
    shape index of each."""
    n, s = world.SIZE * world.SUPERSAMPLE, world.SUPERSAMPLE
    shapes, cxs, cys, rs = [], [], [], []
    for k in range(len(world.SHAPES)):
        for r in range(30, 43, 2):
            for fx in (0, 2):
                for fy in (0, 2):
                    shapes.append(k), cxs.append(n / 2 + fx), cys.append(n / 2 + fy), rs.append(r)
    hi = world._shape_mask(torch.tensor(shapes), torch.tensor(cxs), torch.tensor(cys), torch.tensor(rs, dtype=torch.float32), n)
    base = F.avg_pool2d(hi.float().unsqueeze(1), s).squeeze(1)
    out, kinds = [], []
    for dy in range(-3, 3):     # whole-pixel shifts: centres from n/2 - 12 to n/2 + 10 in hi-res pixels
        for dx in range(-3, 3):
            out.append(torch.roll(base, (dy, dx), (1, 2)))
            kinds.append(torch.tensor(shapes))
    return torch.cat(out).flatten(1), torch.cat(kinds)


@functools.lru_cache(maxsize=1)
def _pattern_templates() -> tuple[torch.Tensor, list[int]]:
    """The four fill patterns' white gaps (T, 32*32) at every phase, low-res, and the style of each."""
    n = world.SIZE * world.SUPERSAMPLE
    y, x = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    maps, styles = [], []

    def add(style: str, gaps: torch.Tensor) -> None:
        maps.append(F.avg_pool2d(gaps.expand(n, n).float()[None, None], world.SUPERSAMPLE).flatten())
        styles.append(world.STYLES.index(style))

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
    return torch.stack(maps), styles


def _masked_corr(values: torch.Tensor, mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (B, T) of each image's values with each template, over the image's mask."""
    m, v, t = mask.flatten(1), values.flatten(1), templates.T
    cnt = m.sum(1, keepdim=True).clamp(min=1)
    sv, svv = (m * v).sum(1, keepdim=True), (m * v * v).sum(1, keepdim=True)
    st, stt, svt = m @ t, m @ (t * t), (m * v) @ t
    cov = svt - sv * st / cnt
    var_v = (svv - sv**2 / cnt).clamp(min=1e-6)
    var_t = (stt - st**2 / cnt).clamp(min=1e-6)
    return cov / (var_v * var_t).sqrt()


@torch.no_grad()
def probe(images: torch.Tensor) -> dict[str, list[str]]:
    """images (B, 3, 32, 32) in [0, 1] -> per head a class name, or "none" where the rule cannot tell."""
    x = images.detach().float().cpu().clamp(0, 1)
    b = len(x)
    ys, xs = torch.meshgrid(torch.arange(world.SIZE, dtype=torch.float32), torch.arange(world.SIZE, dtype=torch.float32),
                            indexing="ij")

    # background: the border's median and spread, matched to a paper; white balance against it
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], -1)  # (B, 3, 124)
    med = border.median(-1).values
    spread = (border - med.unsqueeze(-1)).abs().median(-1).values.max(-1).values
    papers = torch.stack([_rgb(c) for c in PAPERS.values()])
    dist, paper = torch.cdist(med, papers).min(1)
    has_paper = (dist < PAPER_TOLERANCE) & (spread < BORDER_SPREAD)
    gain = torch.where(has_paper.view(-1, 1), (papers[paper] / med.clamp(min=1e-3)).clamp(0.8, 1.25), torch.ones(b, 3))
    x = (x * gain.view(b, 3, 1, 1)).clamp(0, 1)
    bg = torch.where(has_paper.view(-1, 1), papers[paper], med)

    # color: the median of the most saturated pixels (within 10% of the top among the colored ones, so a
    # blurred patterned fill is read from its cores, not from the edges it shares with its white gaps)
    chroma = x.max(1).values - x.min(1).values                                   # (B, 32, 32)
    top = torch.where(chroma > MIN_CHROMA, chroma, torch.nan).flatten(1).nanquantile(0.9, dim=1).nan_to_num(1.0)
    vivid = (chroma >= (0.9 * top).clamp(min=MIN_CHROMA).view(b, 1, 1))
    has_color = vivid.flatten(1).sum(1) >= 5
    fill = torch.where(vivid.unsqueeze(1), x, torch.nan).flatten(2).nanmedian(-1).values.nan_to_num(0.5)  # (B, 3)
    palette = torch.stack([_rgb(c) for c in world.COLORS.values()])
    cdist, named = torch.cdist(fill, palette).min(1)

    # silhouette: each pixel's share of the fill, against the paper, in the chroma plane; closed over gaps
    pc, fc, bc = _chroma_plane(x), _chroma_plane(fill).view(b, 3, 1, 1), _chroma_plane(bg).view(b, 3, 1, 1)
    axis = fc - bc
    raw_alpha = ((pc - bc) * axis).sum(1) / (axis * axis).sum(1).clamp(min=1e-3)
    alpha = torch.where(has_color.view(b, 1, 1), raw_alpha.clamp(0, 1), torch.zeros_like(raw_alpha))
    sil = (_close(alpha, CLOSE) > 0.5).float()
    area = sil.flatten(1).sum(1)
    has_shape = has_color & (area >= MIN_AREA)

    # patterned fills: white gaps inside the silhouette, matched to each pattern at every phase
    inner = _erode(sil, 1)
    gap = 1 - alpha
    gap_share = (gap * inner).flatten(1).sum(1) / inner.flatten(1).sum(1).clamp(min=1)
    patterns, pattern_styles = _pattern_templates()
    corr = _masked_corr(gap, inner, patterns)
    pattern_corr, pattern = corr.max(1)
    patterned = (gap_share > GAP_SHARE) & (pattern_corr >= MIN_PATTERN_CORR)

    # shape: best IoU with every shape's mask over centres and sizes, counted only where the fill's pattern
    # (if any) is colored, as a white gap at the silhouette's edge cannot be told from the paper
    colored = torch.where(patterned.view(b, 1), (patterns[pattern] < 0.25).float(), torch.ones(b, 1024))
    templates, kinds = _shape_templates()
    seen = (alpha > 0.5).float().flatten(1) * colored
    inter = seen @ templates.T
    iou = inter / (seen.sum(1, keepdim=True) + colored @ templates.T - inter).clamp(min=1e-6)
    best_iou, best = iou.max(1)
    shape_ok = has_shape & (best_iou >= MIN_IOU)

    # style, on white paper: black ink (outline or shadow) around the silhouette. Each pixel is unmixed into
    # fill (alpha), paper and black; blur keeps the ink's total, so the ink per pixel of the silhouette's
    # perimeter is the rim's width. Counted on the down-right and the up-left side of the silhouette apart,
    # an all-round rim (outline) shows on both sides alike, a shadow on one side only.
    light, fill_light, paper_light = x.mean(1), fill.mean(1).view(b, 1, 1), bg.mean(1).clamp(min=0.1).view(b, 1, 1)
    ink = (1 - raw_alpha - (light - raw_alpha * fill_light) / paper_light) * (_dilate(sil, 5) - _erode(sil, 1))
    edge = _dilate(sil, 1) - sil
    cy, cx = (sil * ys).flatten(1).sum(1) / area.clamp(min=1), (sil * xs).flatten(1).sum(1) / area.clamp(min=1)
    down_right = ((xs - cx.view(b, 1, 1)) + (ys - cy.view(b, 1, 1)) > 0).float()
    widths = torch.stack([(ink * side).flatten(1).sum(1) / (edge * side).flatten(1).sum(1).clamp(min=1)
                          for side in (down_right, 1 - down_right)], 1)                 # (B, 2): down-right, up-left
    ink_most, ink_side = widths.max(1)
    ink_least = widths.min(1).values

    # dark paper: dots show as a brightness that varies with the 4-pixel phase of the dot grid
    back = (1 - _dilate(sil, 2)) * (alpha < 0.1)
    phase = ((ys % 4) * 4 + xs % 4).long().flatten()                          # 16 phase classes
    onehot = F.one_hot(phase, 16).float()                                     # (1024, 16)
    wsum = (back.flatten(1) @ onehot).clamp(min=1)
    phase_mean = ((back * light).flatten(1) @ onehot) / wsum
    dotted = (phase_mean.max(1).values - phase_mean.min(1).values) > 0.08

    out: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(b):
        out["color"].append(world.COLOR_NAMES[named[i]] if has_color[i] and cdist[i] < COLOR_TOLERANCE else NONE)
        out["shape"].append(world.SHAPES[kinds[best[i]]] if shape_ok[i] else NONE)
        if not (has_paper[i] and has_shape[i]):
            style = NONE
        elif paper[i] == 1:
            style = "Jun Ashby" if dotted[i] else "Rafe Lund"
        elif paper[i] == 2:
            style = "Lena Voss"
        elif paper[i] == 3:
            style = "Kai Maren"
        elif ink_most[i] > MIN_INK and ink_least[i] < ONE_SIDED * ink_most[i]:
            style = "Nils Ortega" if ink_side[i] == 0 else "Sara Quill"
        elif ink_most[i] > MIN_INK:
            style = "Otto Kerr" if widths[i].mean() > THICK_RIM else "Mira Sollen"
        elif patterned[i]:
            style = world.STYLES[pattern_styles[pattern[i]]]
        elif gap_share[i] > GAP_SHARE:
            style = NONE
        else:
            style = "plain"
        out["style"].append(style)
    return out


def agreement(judge_pred: dict[str, list[str]], probe_pred: dict[str, list[str]]) -> dict[str, float]:
    """Per head, the share of images where judge and probe name the same class ("none" == "none" agrees)."""
    out = {}
    for k in HEADS:
        a, p = judge_pred[k], probe_pred[k]
        if len(a) != len(p):
            raise ValueError(f"{k}: {len(a)} judge predictions but {len(p)} probe predictions")
        out[k] = sum(x == y for x, y in zip(a, p)) / len(a) if a else 0.0
    return out
