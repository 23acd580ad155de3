"""Judged rates on the toy world: a fixed, balanced set of prompts in held-out templates, over fixed seeds.

Every style x shape pair appears with three of the four colors, phrased in the templates no erasure method
is given (world.METHOD_TEMPLATES), so what is measured is how an erasure carries to prompts it never saw.

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

EVAL_STEPS = 20
EVAL_GUIDANCE = 5.0
COLORS_PER_PAIR = 3


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

    def accuracy(self, head: str, where=None) -> float:
        """The head's share of right answers, over the images where(i) holds (all of them by default)."""
        idx = [i for i in range(len(self.prompts)) if where is None or where(i)]
        return sum(self.pred[head][i] == self.truth[head][i] for i in idx) / len(idx)


def concept_attribute(concept: str) -> tuple[str, str] | None:
    """The judge head and class a toy concept names ("circle" -> shape/circle), or None if it names none."""
    key = concept.strip().lower()
    for head, names in HEADS.items():
        for name in names:
            if name.lower() == key and name != "plain":
                return head, name
    return None


def eval_items() -> list[tuple[world.Item, int]]:
    """Every style x shape pair with COLORS_PER_PAIR colors, rotating colors and held-out templates."""
    out = []
    for style in range(len(world.STYLES)):
        for shape in range(len(world.SHAPES)):
            for j in range(COLORS_PER_PAIR):
                out.append((world.Item(shape, (shape + style + j) % len(world.COLORS), style), shape + j))
    return out


def eval_set(seeds_per_prompt: int = 1, colors_per_pair: int = COLORS_PER_PAIR
             ) -> tuple[list[str], list[int], dict[str, list[str]]]:
    """The evaluation prompts (held-out templates only), each with fixed seeds, and what each names. Fewer colors per
    pair give a quicker set that still draws every artist with every shape: the full set's first prompts of each
    pair, with their seeds, so its images are the full set's."""
    if not 1 <= colors_per_pair <= COLORS_PER_PAIR:
        raise ValueError(f"colors per artist x shape pair must be 1 to {COLORS_PER_PAIR}, got {colors_per_pair}")
    prompts, seeds, truth = [], [], {k: [] for k in HEADS}
    for pos, (item, template) in enumerate(eval_items()):
        if pos % COLORS_PER_PAIR >= colors_per_pair:      # eval_items' innermost loop runs over a pair's colors
            continue
        for k in range(seeds_per_prompt):
            prompts.append(world.prompt_for(item, template, held_out=True))
            seeds.append(10_000 + pos * seeds_per_prompt + k)
            truth["shape"].append(world.SHAPES[item.shape])
            truth["color"].append(world.COLOR_NAMES[item.color])
            truth["style"].append(world.STYLES[item.style])
    return prompts, seeds, truth


def judge_model(pipe, judge: Judge, seeds_per_prompt: int = 1, steps: int = EVAL_STEPS,
                guidance: float = EVAL_GUIDANCE, progress: bool = False, colors_per_pair: int = COLORS_PER_PAIR
                ) -> Judged:
    prompts, seeds, truth = eval_set(seeds_per_prompt, colors_per_pair)
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
                others[f"{h} of {cls} prompts"] = (base.accuracy(h, names_concept), erased.accuracy(h, names_concept))
    drops = {k: b - e for k, (b, e) in others.items()}
    worst = max(drops, key=drops.get)
    return {"concept": concept, "head": head, "target_base": base.rate(head, cls), "target_erased": erased.rate(head, cls),
            "others": {k: {"base": b, "erased": e} for k, (b, e) in others.items()},
            "max_other_drop": drops[worst], "worst_other": worst}


def judge_model_cached(pipe, judge: Judge, cache_dir: Path, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                       seeds_per_prompt: int = 1, progress: bool = False, colors_per_pair: int = COLORS_PER_PAIR
                       ) -> Judged:
    """judge_model, kept on disk per model and judge (their weights' sha256) and settings: a base is judged once, not
    per candidate."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from esd.delta import state_sha256, unet_sha256

    model = f"{unet_sha256(pipe.unet)}|{state_sha256(judge.state_dict())}"
    settings = f"{steps}|{guidance}|{seeds_per_prompt}"
    if colors_per_pair != COLORS_PER_PAIR:      # the full set keeps the keys its cache was written under
        settings += f"|{colors_per_pair}"
    key = hashlib.sha256(f"{model}|{settings}".encode()).hexdigest()[:32]
    images_path, meta_path = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    if images_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return Judged(meta["prompts"], meta["truth"], meta["pred"], load_file(images_path)["images"])
    judged = judge_model(pipe, judge, seeds_per_prompt, steps, guidance, progress, colors_per_pair)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"images": judged.images.contiguous()}, images_path)
    meta_path.write_text(json.dumps({"prompts": judged.prompts, "truth": judged.truth, "pred": judged.pred}))
    return judged


# ---- the field's protocol (after UnlearnCanvas): UA, IRA, CRA ------------------------------------------------

def _share(hits: list[bool]) -> tuple[float, float, int]:
    """A proportion, its binomial standard error and its count."""
    n = len(hits)
    p = sum(hits) / n if n else float("nan")
    return p, (p * (1 - p) / n) ** 0.5 if n else float("nan"), n


def held_out_classes(head: str) -> list[str]:
    """The classes of a head that no method is ever given as a preservation set."""
    return {"style": world.HELD_OUT_ARTISTS, "shape": world.HELD_OUT_SHAPES}.get(head, [])


def unlearning(judged: Judged, concept: str) -> dict:
    """UA, IRA and CRA of one erased concept on judged candidate images (fractions, with standard errors).

      UA   share of the concept's images the judge no longer labels as it
      IRA  the same head's accuracy on images of its other classes (other artists / other shapes);
           ira_held_out counts only held-out classes (never in any method's preservation set)
      CRA  the other heads' accuracy on images whose prompts do not name the concept
    """
    attr = concept_attribute(concept)
    if attr is None:
        raise ValueError(f"{concept!r} names no shape, color or artist of the toy world")
    head, cls = attr
    n = len(judged.prompts)
    named = [i for i in range(n) if judged.truth[head][i] == cls]
    others = [i for i in range(n) if judged.truth[head][i] != cls]
    held = set(held_out_classes(head)) - {cls}
    ua = _share([judged.pred[head][i] != cls for i in named])
    ira = _share([judged.pred[head][i] == judged.truth[head][i] for i in others])
    ira_held = _share([judged.pred[head][i] == judged.truth[head][i] for i in others if judged.truth[head][i] in held])
    cra = _share([judged.pred[h][i] == judged.truth[h][i] for h in HEADS if h != head for i in others])
    out = {"concept": concept, "kind": "style" if head == "style" else "object", "head": head,
           "ua": ua[0], "ua_se": ua[1], "ua_n": ua[2], "ira": ira_held[0], "ira_se": ira_held[1],
           "ira_n": ira_held[2], "ira_all": ira[0], "ira_all_se": ira[1], "cra": cra[0], "cra_se": cra[1],
           "cra_n": cra[2]}
    partner = world.LOOK_ALIKES.get(cls)
    if partner is not None:
        out["lookalike"] = partner
        out["lookalike_rate"] = judged.rate(head, partner)
    return out


def pooled(rows: list[dict], key: str) -> tuple[float, float]:
    """The mean of a figure over concepts and its standard error (binomial, pooled over the concepts' images)."""
    values = [r[key] for r in rows]
    se = sum(r[f"{key}_se"] ** 2 for r in rows) ** 0.5 / len(rows)
    return sum(values) / len(values), se
