"""The pixel probes: hand-written rules that read shape, color and style back from renders."""

import pytest
import torch

from esd.toy import world
from esd.toy.judge import augment
from esd.toy.probes import NONE, agreement, probe


def _accuracy(augmented: bool, seeds: tuple[int, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-head accuracy, and per-style accuracy of the style head, over every item at each seed."""
    items = world.all_items()
    hits = {k: 0 for k in ("shape", "color", "style")}
    style_hits = {s: 0 for s in world.STYLES}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        images = world.render(items, gen)
        if augmented:
            images = augment(images, gen)
        pred = probe(images)
        for i, item in enumerate(items):
            truth = {"shape": world.SHAPES[item.shape], "color": world.COLOR_NAMES[item.color],
                     "style": world.STYLES[item.style]}
            for k in hits:
                hits[k] += pred[k][i] == truth[k]
            style_hits[truth["style"]] += pred["style"][i] == truth["style"]
    n = len(items) * len(seeds)
    return {k: v / n for k, v in hits.items()}, {s: v * len(world.STYLES) / n for s, v in style_hits.items()}


@pytest.mark.parametrize("augmented", [False, True])
def test_probes_read_every_item(augmented):
    acc, per_style = _accuracy(augmented, seeds=(0,) if not augmented else (100,))
    assert min(acc.values()) >= 0.95, acc
    assert acc["shape"] >= 0.98 and acc["color"] >= 0.98, acc
    assert min(per_style.values()) >= 0.9, per_style


def test_probes_reject_noise():
    noise = torch.rand(200, 3, world.SIZE, world.SIZE, generator=torch.Generator().manual_seed(0))
    pred = probe(noise)
    rejected = sum(pred["style"][i] == NONE or pred["shape"][i] == NONE for i in range(len(noise))) / len(noise)
    assert rejected >= 0.8


def test_probe_output_format():
    gen = torch.Generator().manual_seed(5)
    images = world.render(world.all_items()[:7], gen)
    pred = probe(images)
    assert set(pred) == {"shape", "color", "style"}
    assert all(len(v) == 7 for v in pred.values())
    assert set(pred["shape"]) <= set(world.SHAPES) | {NONE}
    assert set(pred["color"]) <= set(world.COLOR_NAMES) | {NONE}
    assert set(pred["style"]) <= set(world.STYLES) | {NONE}


def test_agreement_counts_matches_and_none():
    judge_pred = {"shape": ["circle", "square", NONE, "heart"], "color": ["red", "red", "blue", NONE],
                  "style": ["plain", NONE, "Otto Kerr", "Ada Pell"]}
    probe_pred = {"shape": ["circle", "circle", NONE, "heart"], "color": ["red", "green", "green", "red"],
                  "style": ["plain", NONE, "Otto Kerr", "Ada Pell"]}
    assert agreement(judge_pred, probe_pred) == {"shape": 0.75, "color": 0.25, "style": 1.0}
    with pytest.raises(ValueError):
        agreement({"shape": ["circle"]}, {"shape": []})
