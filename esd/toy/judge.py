"""The toy world's judge: a small CNN with shape, color and style heads and a reject option.

It plays the role of the paper's ImageNet classifier. Each head has one extra class, "none", trained on
images that show no clean toy picture (noise, blends of two pictures, scrambled patches, blobs, blank
canvases), and a prediction below a confidence floor is also "none". So a collapsed or broken model
cannot score as preserved: its images are rejected, not counted as some class.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from esd.toy import world

NONE = "none"
HEADS = {"shape": world.SHAPES, "color": world.COLOR_NAMES, "style": world.STYLES}
CONFIDENCE_FLOOR = 0.6


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(16 * w, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v) + 1) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, 32, 32) in [0, 1] -> logits per head, the last class of each being "none"."""
        h = self.features(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch: int = 256) -> dict[str, list[str]]:
        """Class names per head; "none" where the judge rejects the image."""
        self.eval()
        out: dict[str, list[str]] = {k: [] for k in HEADS}
        for i in range(0, len(images), batch):
            logits = self(images[i : i + batch].float())
            for k, names in HEADS.items():
                p = logits[k].softmax(-1)
                conf, idx = p.max(-1)
                for c, j in zip(conf.tolist(), idx.tolist()):
                    out[k].append(names[j] if j < len(names) and c >= CONFIDENCE_FLOOR else NONE)
        return out

    def save(self, folder: Path, metrics: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in self.state_dict().items()}, folder / "judge.safetensors")
        (folder / "judge.json").write_text(json.dumps({"heads": HEADS, "metrics": metrics}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        path = Path(folder) / "judge.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"judge weights not found: {path}")
        judge = cls()
        judge.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return judge.eval()


def negatives(count: int, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
    """Images that are no clean toy picture: noise, blends, scrambled patches, blobs, blank canvases."""
    kinds = torch.randint(0, 5, (count,), generator=gen)
    out = torch.empty(count, 3, world.SIZE, world.SIZE)
    items = world.sample_items(count, rng)
    a = world.render(items, gen)
    # a blend's partner differs in shape and in color, so neither head may name one of them
    n_shapes, n_colors = len(world.SHAPES), len(world.COLORS)
    other = [world.Item((i.shape + rng.randrange(1, n_shapes)) % n_shapes, (i.color + rng.randrange(1, n_colors)) % n_colors,
                        rng.randrange(len(world.STYLES))) for i in items]
    b = world.render(other, gen)
    for i, k in enumerate(kinds.tolist()):
        if k == 0:
            out[i] = torch.rand(3, world.SIZE, world.SIZE, generator=gen)
        elif k == 1:
            w = 0.35 + 0.3 * torch.rand(1, generator=gen).item()
            out[i] = w * a[i] + (1 - w) * b[i]
        elif k == 2:
            patches = a[i].unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, 16, 8, 8)
            patches = patches[:, torch.randperm(16, generator=gen)].reshape(3, 4, 4, 8, 8)
            out[i] = patches.permute(0, 1, 3, 2, 4).reshape(3, 32, 32)
        elif k == 3:
            low = torch.rand(1, 3, 4, 4, generator=gen)
            out[i] = F.interpolate(low, size=32, mode="bilinear", align_corners=False)[0]
        else:
            out[i] = torch.rand(3, 1, 1, generator=gen).expand(3, 32, 32) * torch.rand(1, generator=gen).item()
    return out.clamp(0, 1)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and brightness changes, the imperfections of a decoded generation."""
    b = len(images)
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=gen) * 0.6
    images = (1 - w) * images + w * blur
    images = images * (1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12)
    images = images + torch.randn(images.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.04
    return images.clamp(0, 1)


def hard_positives(count: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images an erasure or a recovery attack makes, with the labels an honest judge gives them:
    an artist's look at reduced contrast or over part of the picture still counts as that artist (a style
    is not gone because it is fainter), and a fill off the palette keeps its shape and style but names no
    color. So the style and shape heads do not lean on the color, nor on a pattern's full strength."""
    items = [world.Item(i.shape, i.color, 1 + rng.randrange(len(world.ARTISTS))) for i in world.sample_items(count, rng)]
    plain = [world.Item(i.shape, i.color, 0) for i in items]
    off_palette = torch.rand(count, generator=gen) < 0.4
    fill = torch.rand(count, 3, generator=gen) * 0.85 + 0.05
    named = torch.tensor([world.COLORS[world.COLOR_NAMES[i.color]] for i in items], dtype=torch.float32) / 255
    fill = torch.where(off_palette.view(-1, 1), fill, named)
    twin = torch.Generator().set_state(gen.get_state())   # same positions and sizes for both renders
    styled, base = world.render(items, gen, fill), world.render(plain, twin, fill)
    strength = 0.5 + 0.5 * torch.rand(count, 1, 1, 1, generator=gen)
    half = torch.zeros(count, 1, world.SIZE, world.SIZE)
    for i in range(count):
        side = rng.randrange(4)
        sl = [slice(None), slice(None)]
        sl[side // 2] = slice(0, world.SIZE * 2 // 3) if side % 2 else slice(world.SIZE // 3, None)
        half[i, 0][tuple(sl)] = 1
    partial = torch.rand(count, 1, 1, 1, generator=gen) < 0.3
    weight = torch.where(partial, half, strength)
    images = base + weight * (styled - base)
    y = labels(items)
    # an off-palette fill close to a named color is that color
    palette = torch.tensor(list(world.COLORS.values()), dtype=torch.float32) / 255
    dist, nearest = torch.cdist(fill, palette).min(1)
    y["color"] = torch.where(~off_palette, y["color"], torch.where(dist < 0.2, nearest, len(world.COLORS)))
    return images.clamp(0, 1), y


def labels(items: list[world.Item]) -> dict[str, torch.Tensor]:
    return {"shape": torch.tensor([i.shape for i in items]), "color": torch.tensor([i.color for i in items]),
            "style": torch.tensor([i.style for i in items])}


def train(seed: int, steps: int, reconstruct=None, batch: int = 128) -> tuple[Judge, dict]:
    """Train the judge on renders (and, if given, their VAE reconstructions) plus negatives."""
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    n_neg, n_hard = batch // 4, batch // 8
    bar = tqdm(range(steps), desc="judge", leave=False)
    for _ in bar:
        items = world.sample_items(batch - n_neg - n_hard, rng)
        hard, y_hard = hard_positives(n_hard, gen, rng)
        pos = torch.cat([world.render(items, gen), hard])
        if reconstruct is not None:
            half = len(pos) // 2
            pos = torch.cat([pos[:half], reconstruct(pos[half:])])
        x = torch.cat([augment(pos, gen), augment(negatives(n_neg, gen, rng), gen)])
        y = {k: torch.cat([v, y_hard[k], torch.full((n_neg,), len(HEADS[k]))]) for k, v in labels(items).items()}
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    judge.eval()
    return judge, held_out_metrics(judge, seed + 1000)


def held_out_metrics(judge: Judge, seed: int, count: int = 1024) -> dict:
    """Accuracy per head on fresh renders, and the share of negatives judged "none" on every head."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    items = world.sample_items(count, rng)
    pred = judge.classify(world.render(items, gen))
    truth = {k: [HEADS[k][j] for j in v.tolist()] for k, v in labels(items).items()}
    acc = {k: sum(p == t for p, t in zip(pred[k], truth[k])) / count for k in HEADS}
    neg = judge.classify(negatives(count, gen, rng))
    rejected = sum(all(neg[k][i] == NONE for k in HEADS) for i in range(count)) / count
    return {"accuracy": acc, "negatives_rejected": rejected}
