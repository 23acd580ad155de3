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
    other = [world.Item((i.shape + rng.randrange(1, 4)) % 4, (i.color + rng.randrange(1, 4)) % 4,
                        rng.randrange(4)) for i in items]
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
    images = images * (1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.12)
    images = images + torch.randn(images.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.04
    return images.clamp(0, 1)


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
    n_neg = batch // 4
    bar = tqdm(range(steps), desc="judge", leave=False)
    for _ in bar:
        items = world.sample_items(batch - n_neg, rng)
        pos = world.render(items, gen)
        if reconstruct is not None:
            half = len(pos) // 2
            pos = torch.cat([pos[:half], reconstruct(pos[half:])])
        x = torch.cat([augment(pos, gen), augment(negatives(n_neg, gen, rng), gen)])
        y = {k: torch.cat([v, torch.full((n_neg,), len(HEADS[k]))]) for k, v in labels(items).items()}
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
