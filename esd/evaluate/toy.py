"""Judged rates on the toy world: every shape x color x style prompt, in every template, over fixed seeds.

A concept's rate is the share of images from prompts naming it that the judge labels as it. For an erasure
the target rate should fall; everything else should hold:
  - the other classes of the erased concept's head (other shapes, other styles), on their own prompts;
  - the other heads' classes on prompts that do not name the erased concept;
  - for a style, also the shapes and colors of its own prompts (an erased artist should still draw the
    red circle that was asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from esd import sample
from esd.toy import world
from esd.toy.judge import HEADS, Judge

EVAL_STEPS = 25
EVAL_GUIDANCE = 5.0
TEMPLATES = 3


@dataclass
class Judged:
    """Generated images with the truth their prompts asked for and what the judge saw."""
    prompts: list[str]
    truth: dict[str, list[str]]
    pred: dict[str, list[str]]
    images: torch.Tensor

    def rate(self, head: str, cls: str, where=None) -> float | None:
        idx = [i for i, t in enumerate(self.truth[head]) if t == cls and (where is None or where(i))]
        if not idx:
            return None
        return sum(self.pred[head][i] == cls for i in idx) / len(idx)

    def accuracy(self, head: str) -> float:
        return sum(p == t for p, t in zip(self.pred[head], self.truth[head])) / len(self.prompts)


def concept_attribute(concept: str) -> tuple[str, str] | None:
    """The judge head and class a toy concept names ("circle" -> shape/circle), or None if it names none."""
    key = concept.strip().lower()
    for head, names in HEADS.items():
        for name in names:
            if name.lower() == key and name != "plain":
                return head, name
    return None


def eval_set(seeds_per_prompt: int = 1) -> tuple[list[str], list[int], dict[str, list[str]]]:
    """Every item in every template, each with fixed seeds."""
    prompts, seeds, truth = [], [], {k: [] for k in HEADS}
    for item in world.all_items():
        for template in range(TEMPLATES):
            for s in range(seeds_per_prompt):
                prompts.append(world.prompt_for(item, template))
                seeds.append(10_000 + len(seeds))
                truth["shape"].append(world.SHAPES[item.shape])
                truth["color"].append(world.COLOR_NAMES[item.color])
                truth["style"].append(world.STYLES[item.style])
    return prompts, seeds, truth


def judge_model(pipe, judge: Judge, seeds_per_prompt: int = 1, steps: int = EVAL_STEPS,
                guidance: float = EVAL_GUIDANCE, progress: bool = False) -> Judged:
    prompts, seeds, truth = eval_set(seeds_per_prompt)
    images = sample.generate(pipe, prompts, seeds, steps=steps, guidance=guidance, progress=progress)
    return Judged(prompts, truth, judge.classify(images), images)


def base_summary(judged: Judged) -> dict[str, float]:
    return {head: judged.accuracy(head) for head in HEADS}


def compare(base: Judged, erased: Judged, concept: str) -> dict:
    """Target rate before and after, and every preserved rate before and after, for one erased concept."""
    attr = concept_attribute(concept)
    if attr is None:
        raise ValueError(f"{concept!r} names no shape, color or artist of the toy world")
    head, cls = attr
    names_concept = lambda i: base.truth[head][i] == cls  # noqa: E731
    others: dict[str, tuple[float, float]] = {}
    for h, names in HEADS.items():
        for name in names:
            if h == head and name == cls:
                continue
            where = None if h == head else (lambda i: not names_concept(i))
            b, e = base.rate(h, name, where), erased.rate(h, name, where)
            if b is not None:
                others[f"{h}:{name}"] = (b, e)
    if head == "style":
        for h in HEADS:
            if h != head:
                idx = [i for i in range(len(base.prompts)) if names_concept(i)]
                b = sum(base.pred[h][i] == base.truth[h][i] for i in idx) / len(idx)
                e = sum(erased.pred[h][i] == erased.truth[h][i] for i in idx) / len(idx)
                others[f"{h} of {cls} prompts"] = (b, e)
    drops = {k: b - e for k, (b, e) in others.items()}
    worst = max(drops, key=drops.get)
    return {"concept": concept, "head": head, "target_base": base.rate(head, cls), "target_erased": erased.rate(head, cls),
            "others": {k: {"base": b, "erased": e} for k, (b, e) in others.items()},
            "max_other_drop": drops[worst], "worst_other": worst}


def judge_model_cached(pipe, judge: Judge, cache_dir: Path, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                       seeds_per_prompt: int = 1) -> Judged:
    """judge_model, kept on disk per model (UNet sha256) and settings: a base is judged once, not per candidate."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from esd.delta import unet_sha256

    key = hashlib.sha256(f"{unet_sha256(pipe.unet)}|{steps}|{guidance}|{seeds_per_prompt}".encode()).hexdigest()[:32]
    images_path, meta_path = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    if images_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return Judged(meta["prompts"], meta["truth"], meta["pred"], load_file(images_path)["images"])
    judged = judge_model(pipe, judge, seeds_per_prompt, steps, guidance)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"images": judged.images.contiguous()}, images_path)
    meta_path.write_text(json.dumps({"prompts": judged.prompts, "truth": judged.truth, "pred": judged.pred}))
    return judged
